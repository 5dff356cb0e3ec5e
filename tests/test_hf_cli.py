"""``stablemorph grow DIR ... --out DIR2`` on save_pretrained folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from stablemorph.cli import main
from tests.hf_cases import gpt2, llama


def test_grow_folder_to_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import transformers as tf

    parent = llama(tied=True)
    parent.save_pretrained(tmp_path / "p")
    out = tmp_path / "c"
    assert main(["grow", str(tmp_path / "p"), "--layers", "4", "--hidden", "48",
                 "--kv-heads", "4", "--mlp", "96", "--out", str(out)]) == 0
    assert "grow('LlamaForCausalLM', scheme='stable')" in capsys.readouterr().out
    child = tf.AutoModelForCausalLM.from_pretrained(out)
    assert (child.config.num_hidden_layers, child.config.hidden_size,
            child.config.num_key_value_heads, child.config.intermediate_size) == (4, 48, 4, 96)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        a, b = parent(ids).logits, child(ids).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * a.abs().max().item())


def test_grow_folder_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["grow", str(tmp_path), "--layers", "3", "--out", str(tmp_path / "c")]) == 2
    assert "no config.json; expected a save_pretrained folder" in capsys.readouterr().err
    gpt2().save_pretrained(tmp_path / "g")
    assert main(["grow", str(tmp_path / "g"), "--hidden", "48", "--out",
                 str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "stablemorph grow: error: grow GPT2LMHeadModel: hidden=48: with a LayerNorm" in err
    assert not (tmp_path / "c").exists()
    assert main(["grow", str(tmp_path / "g"), "--layers", "3", "--out",
                 str(tmp_path / "g")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (tmp_path / "g" / "config.json").write_text(json.dumps(config))
    assert main(["grow", str(tmp_path / "g"), "--layers", "3", "--out",
                 str(tmp_path / "c")]) == 2
    assert "architecture 'BertForMaskedLM' is not supported" in capsys.readouterr().err


@pytest.mark.parametrize("case, op, layer", [
    ("bert", "deepen", "bert.encoder.layer.1.output.dense"),
    ("bert", "insert_subnet", "classifier"),
    ("vit", "deepen", "classifier"),
])
def test_morph_a_saved_hf_model_probes_it_with_its_own_inputs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, op: str,
        layer: str) -> None:
    """`stablemorph morph` on an sm.save'd Hugging Face model: without --input-shape the
    probe is built from the config (token ids with a mask, or pixel values), not a float
    tensor shaped like the first Linear's input."""
    import stablemorph as sm
    from tests.hf_cases import bert, vit

    parent = {"bert": bert, "vit": vit}[case]().eval()
    sm.save(parent, tmp_path / "p.pt")
    assert main(["morph", "--checkpoint", str(tmp_path / "p.pt"), "--op", op, "--at", layer,
                 "--out", str(tmp_path / "c.pt")]) == 0
    assert f"{op}('{layer}', scheme='stable')" in capsys.readouterr().out
    child = sm.load(tmp_path / "c.pt").eval()
    x = (torch.randint(0, 100, (3, 9)) if case == "bert" else torch.randn(3, 3, 16, 16))
    with torch.no_grad():
        a, b = parent(x).logits, child(x).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
