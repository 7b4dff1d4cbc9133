"""LlamaGen checkpoints as its training scripts leave them, and models they do not fit.

* ``train_c2i_fsdp.py`` writes a folder per step: ``consolidated.pth`` (the bare state dict) beside
  one ``optimizer.RRRRR-of-WWWWW.pth`` per rank and ``resume_step.txt``; the folder itself loads.
* FSDP and activation checkpointing name wrapped modules ``_fsdp_wrapped_module.`` /
  ``_checkpoint_wrapped_module.`` inside the keys (a state dict not taken as FULL_STATE_DICT).
* ``train_c2i.py`` pickles its ``argparse.Namespace`` next to the weights.
* A model of LlamaGen's tensors with other positions (1-D rotary) is refused; a file of another
  size says which model it holds.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import llamagen_reference

import aimkit
from aimkit.errors import CheckpointError
from aimkit.llamagen import is_llamagen, to_llamagen


@pytest.fixture
def reference():
    return llamagen_reference()


def test_an_fsdp_checkpoint_folder_loads_through_its_consolidated_file(tmp_path, reference):
    gen, codes, labels, logits = reference
    folder = tmp_path / "0050000"
    folder.mkdir()
    torch.save(to_llamagen(gen), folder / "consolidated.pth")
    for rank in range(2):
        torch.save({"state": {}, "param_groups": []}, folder / f"optimizer.{rank:05d}-of-00002.pth")
    (folder / "resume_step.txt").write_text("50000\n")
    loaded = aimkit.build("llamagen-test", pretrained=folder).eval()
    with torch.no_grad():
        assert torch.equal(loaded(codes, labels), logits)


def test_fsdp_and_checkpoint_wrapper_names_inside_keys_are_removed(tmp_path, reference):
    gen, codes, labels, logits = reference
    state = {}
    for key, value in to_llamagen(gen).items():
        if key.startswith("layers."):
            index, rest = key[len("layers.") :].split(".", 1)
            key = f"layers.{index}._fsdp_wrapped_module._checkpoint_wrapped_module.{rest}"
        state["_fsdp_wrapped_module." + key] = value
    assert is_llamagen(state)
    torch.save(state, tmp_path / "consolidated.pth")
    loaded = aimkit.build("llamagen-test", pretrained=tmp_path / "consolidated.pth").eval()
    with torch.no_grad():
        assert torch.equal(loaded(codes, labels), logits)


def test_train_c2i_checkpoint_with_optimizer_steps_and_args_loads(tmp_path, reference):
    gen, codes, labels, logits = reference
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    params[0].grad = torch.ones(3)
    optimizer.step()
    args = argparse.Namespace(gpt_model="GPT-B", gpt_type="c2i", lr=1e-4, beta1=0.9, ema=False, gpt_ckpt=None)
    state = {f"_orig_mod.{k}": v.bfloat16() for k, v in to_llamagen(gen).items()}
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "steps": 7, "args": args}, tmp_path / "0000007.pt")
    loaded = aimkit.build("llamagen-test", pretrained=tmp_path / "0000007.pt", dtype=torch.bfloat16).eval()
    want = {k: v.bfloat16() for k, v in to_llamagen(gen).items()}
    assert all(torch.equal(to_llamagen(loaded)[k], v) for k, v in want.items())


def test_a_model_with_one_dimensional_rotary_positions_is_refused(tmp_path, reference):
    """Every tensor fits, but LlamaGen's positions are 2-D: loading would give other logits."""
    torch.save({"model": to_llamagen(reference[0])}, tmp_path / "c2i.pt")
    with pytest.raises(CheckpointError, match="'1d' rotary positions"):
        aimkit.build("llamagen-test", rope="1d", pretrained=tmp_path / "c2i.pt")


def test_a_checkpoint_without_both_embeddings_is_still_read_as_llamagens(tmp_path, reference):
    state = {k: v for k, v in to_llamagen(reference[0]).items() if not k.startswith(("tok_emb", "cls_emb"))}
    torch.save({"model": state}, tmp_path / "c2i.pt")
    with pytest.raises(
        CheckpointError,
        match=r"2 missing \(cls_embedding\.embedding_table\.weight, "
        r"tok_embeddings\.weight\)",
    ):
        aimkit.build("llamagen-test", pretrained=tmp_path / "c2i.pt")


def test_a_larger_gpt_names_its_mis_shaped_tensors_and_its_size(tmp_path):
    other = to_llamagen(aimkit.build("llamagen-test", d_model=128, n_layer=3))
    torch.save({"model": other}, tmp_path / "c2i.pt")
    with pytest.raises(CheckpointError) as info:
        aimkit.build("llamagen-test", pretrained=tmp_path / "c2i.pt")
    text = str(info.value)
    assert "mis-shaped (" in text and "tok_embeddings.weight: file (64, 128) vs model (64, 64)" in text
    assert "7 unexpected (layers.2.attention.wqkv.weight, " in text  # layer 2's seven tensors
    assert "the file holds a LlamaGen GPT of d_model 128 and 3 layers" in text


def test_a_preset_sized_file_is_named_by_its_preset():
    """GPT-L's shapes against llamagen-b (meta tensors: nothing allocated)."""
    from aimkit.llamagen import describe_misfit

    gpt_l = to_llamagen(aimkit.build("llamagen-l", device="meta", tokenizer=None))
    why = describe_misfit(aimkit.build("llamagen-b", device="meta", tokenizer=None), gpt_l)
    assert "d_model 1024 and 24 layers (the llamagen-l preset)" in why


def test_a_class_table_without_the_null_row_says_so(tmp_path, reference):
    """LlamaGen trained with class_dropout_prob 0 has num_classes rows; aimkit's guidance needs the null row."""
    state = to_llamagen(reference[0])
    state["cls_embedding.embedding_table.weight"] = state["cls_embedding.embedding_table.weight"][:10].clone()
    torch.save({"model": state}, tmp_path / "c2i.pt")
    with pytest.raises(CheckpointError, match=r"file \(10, 64\) vs model \(11, 64\).*no null-class row"):
        aimkit.build("llamagen-test", pretrained=tmp_path / "c2i.pt")
