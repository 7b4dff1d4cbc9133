"""Tests of the autoregressive sampler and ``generate`` on tiny Mamba2 and transformer generators."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import randomize_

import aimkit
from aimkit.errors import ConfigError
from aimkit.policy import ExecutionPolicy
from aimkit.registry import SAMPLERS
from aimkit.samplers import AutoregressiveConfig, AutoregressiveSampler, generate, resolve_labels, save_grid

COMMON = dict(d_model=32, n_layer=2, num_classes=10, num_tokens=16, vocab_size=64, tokenizer=None)
BACKBONE_KWARGS = {
    "mamba2": dict(d_state=16, headdim=8),
    "transformer": dict(backbone="transformer", n_head=4, mlp_hidden=64),
}


def _tiny(backbone="mamba2", seed=0, policy=None, **extra):
    torch.manual_seed(seed)
    policy = ExecutionPolicy(chunk_size=8) if policy is None else policy
    return randomize_(aimkit.build("aim-b", **COMMON, **BACKBONE_KWARGS[backbone], policy=policy, **extra), seed=seed)


@pytest.fixture(scope="module", params=["mamba2", "transformer"])
def model(request):
    return _tiny(request.param)


class Recorder:
    """Wraps a generator, keeping a copy of every logits tensor prefill/decode_step return."""

    def __init__(self, model, garbage_cache=False):
        self.model, self.garbage_cache, self.seen = model, garbage_cache, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def allocate_inference_cache(self, batch_size, dtype=None):
        params = self.model.allocate_inference_cache(batch_size, dtype=dtype)
        if self.garbage_cache:  # what a reused (CUDA-graph) cache holds from an earlier run
            for tensors in params.key_value_memory_dict.values():
                for t in tensors:
                    t.normal_()
        return params

    def prefill(self, cond, params):
        out = self.model.prefill(cond, params)
        self.seen.append(out.clone())
        return out

    def decode_step(self, tokens, cond, params):
        out = self.model.decode_step(tokens, cond, params)
        self.seen.append(out.clone())
        return out


def _sample(model, labels, **kwargs):
    args = dict(cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0)
    args.update(kwargs)
    return AutoregressiveSampler().sample_tokens(model, torch.as_tensor(labels), **args)


# ---------------------------------------------------------------- cached decoding == teacher forcing
@pytest.mark.parametrize("garbage_cache", [False, True])
def test_decode_logits_match_teacher_forcing(model, garbage_cache):
    """Every step's logits (both guidance halves) equal the full forward on the sampled codes."""
    labels = torch.tensor([1, 7, 3])
    rec = Recorder(model, garbage_cache=garbage_cache)
    codes = _sample(rec, labels, cfg_scale=2.5, generator=torch.Generator().manual_seed(0))
    assert len(rec.seen) == model.num_tokens
    seen = torch.stack(rec.seen, dim=1)  # (2B, N, V)
    rows = torch.cat([labels, torch.full_like(labels, model.null_class)])
    with torch.no_grad():
        forced = model(torch.cat([codes, codes]), rows)  # (2B, N, V)
    assert (seen - forced).abs().max().item() <= 1e-4


def test_position_offset_one_departs_from_teacher_forcing(model):
    backbone = "transformer" if model.config.backbone.name == "transformer" else "mamba2"
    official = _tiny(backbone, decode_position_offset=1)
    official.load_state_dict(model.state_dict())
    assert official.position_offset == 1
    labels = torch.tensor([2, 5])
    rec = Recorder(official)
    codes = _sample(rec, labels, temperature=0.0)
    seen = torch.stack(rec.seen, dim=1)
    with torch.no_grad():
        forced = official(codes, labels)
    assert (seen[:, 0] - forced[:, 0]).abs().max().item() <= 1e-4  # the class token: no position
    assert (seen[:, 1:] - forced[:, 1:]).abs().max().item() > 1e-3


# ---------------------------------------------------------------- guidance
def test_guidance_scale_one_is_the_conditional_branch(model):
    labels = torch.tensor([0, 4, 9])
    plain = Recorder(model)
    codes_plain = _sample(plain, labels, temperature=0.0)
    assert plain.seen[0].shape[0] == 3  # cfg_scale == 1: no unconditional rows at all
    doubled = Recorder(model)
    codes_doubled = _sample(doubled, labels, cfg_scale=4.0, temperature=0.0, schedule=lambda k, n, s: 1.0)
    assert doubled.seen[0].shape[0] == 6
    assert torch.equal(codes_plain, codes_doubled)
    cond_half = torch.stack([s[:3] for s in doubled.seen])
    assert torch.allclose(torch.stack(plain.seen), cond_half, atol=1e-5)


def test_guidance_changes_tokens(model):
    labels = torch.tensor([0, 4, 9, 1])
    a = _sample(model, labels, temperature=0.0)
    b = _sample(model, labels, cfg_scale=8.0, temperature=0.0)
    c = _sample(model, labels, cfg_scale=8.0, temperature=0.0, schedule="linear")
    assert not torch.equal(a, b)
    assert torch.equal(a[:, 0], c[:, 0])  # linear starts at scale 1


# ---------------------------------------------------------------- generate()
def test_tokens_output_and_seeds(model):
    out = generate(model, [3, 1], num_images=5, output="tokens", seed=0, batch_size=2, progress=False)
    assert out.shape == (5, model.num_tokens) and out.dtype == torch.int64 and out.device.type == "cpu"
    assert 0 <= int(out.min()) and int(out.max()) < model.vocab_size
    again = generate(model, [3, 1], num_images=5, output="tokens", seed=0, batch_size=2, progress=False)
    other = generate(model, [3, 1], num_images=5, output="tokens", seed=1, batch_size=2, progress=False)
    assert torch.equal(out, again)
    assert not torch.equal(out, other)


def test_defaults_choose_preset_settings(model):
    config = model.config
    pretty = dataclasses.replace(config.pretty_sampling, temperature=0.0)
    model.config = dataclasses.replace(config, pretty_sampling=pretty)
    try:
        a = generate(model, [1, 2], output="tokens", defaults="pretty", seed=0, progress=False)
        b = generate(model, [1, 2], output="tokens", defaults="pretty", seed=1, progress=False)
        c = generate(model, [1, 2], output="tokens", defaults="fid", seed=1, progress=False)
    finally:
        model.config = config
    assert torch.equal(a, b)  # greedy preset: the seed does not matter
    assert not torch.equal(b, c)


def test_resolve_labels(model):
    assert resolve_labels(model, [1, 2], num_images=5).tolist() == [1, 2, 1, 2, 1]
    assert resolve_labels(model, 7).tolist() == [7]
    assert resolve_labels(model, np.array([0, 9])).tolist() == [0, 9]
    r1 = resolve_labels(model, None, num_images=50, seed=3)
    assert torch.equal(r1, resolve_labels(model, None, num_images=50, seed=3))
    assert not torch.equal(r1, resolve_labels(model, None, num_images=50, seed=4))
    assert 0 <= int(r1.min()) and int(r1.max()) < model.num_classes


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
        (dict(cfg_scale=float("inf")), "cfg_scale must be a finite number"),
        (dict(cfg_scale="high"), "cfg_scale must be a finite number"),
        (dict(labels=[10]), r"label 10 is outside \[0, 10\)"),
        (dict(labels=[-1, 2]), r"label -1 is outside \[0, 10\)"),
        (dict(labels=[1.5]), "labels must be a non-empty 1-D list"),
        (dict(labels=None), "pass labels, num_images, or both"),
        (dict(num_images=0), "num_images must be a positive integer"),
        (dict(output="png"), "unknown output 'png'"),
        (dict(output="pil"), "needs a tokenizer"),
        (dict(defaults="best"), "defaults must be 'fid' or 'pretty'"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(seed=-3), "seed must be an integer"),
        (dict(schedule="cosine"), "unknown guidance schedule"),
    ],
)
def test_bad_arguments(model, kwargs, message):
    args = dict(labels=[1], output="tokens", progress=False)
    args.update(kwargs)
    labels = args.pop("labels")
    with pytest.raises(ConfigError, match=message):
        generate(model, labels, **args)


def test_sampler_registered_and_chosen_from_config(model):
    assert SAMPLERS.get("autoregressive") is AutoregressiveSampler
    assert model.config.sampler.config == AutoregressiveConfig()
    sampler = AutoregressiveSampler(AutoregressiveConfig())
    out = generate(model, [1], output="tokens", seed=0, sampler=sampler, progress=False)
    assert sampler.last_capture_seconds == 0.0  # eager on CPU
    assert torch.equal(out, generate(model, [1], output="tokens", seed=0, sampler="autoregressive", progress=False))


# ---------------------------------------------------------------- grid
def test_save_grid(tmp_path):
    from PIL import Image

    images = np.random.default_rng(0).integers(0, 255, (5, 16, 16, 3), dtype=np.uint8)
    path = save_grid(images, tmp_path / "sub" / "grid.png", nrow=3)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 18 + 2, 3 * 18 + 2, 3)
    assert np.array_equal(grid[2:18, 2:18], images[0])
    captioned_path = save_grid(images, tmp_path / "c.png", labels=[0, 1, 2, 3, 4], class_names=["a"] * 5)
    captioned = np.asarray(Image.open(captioned_path))
    assert captioned.shape[0] > grid.shape[0]
    with pytest.raises(ConfigError, match="uint8"):
        save_grid(images.astype(np.float32), tmp_path / "x.png")


# ---------------------------------------------------------------- CUDA graphs (device machine only)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backbone", ["mamba2", "transformer"])
def test_cuda_graph_step_matches_teacher_forcing_on_reuse(backbone):
    from aimkit.samplers._cuda_graph import clear_decode_graphs, get_decode_graph

    model = _tiny(backbone).cuda()
    labels = torch.tensor([1, 7, 3], device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    with torch.inference_mode():
        cond = model.condition(labels)
        graph, seconds = get_decode_graph(model, cond, 3, model.policy)
        assert seconds > 0 and get_decode_graph(model, cond, 3, model.policy) == (graph, 0.0)
        other, seconds = get_decode_graph(model, cond, 3, model.policy.replace(decode_glue="reference"))
        assert other is not graph and seconds > 0  # another policy: another graph
        for _run in range(2):  # the second run reuses the cache the first one filled
            codes = torch.randint(0, model.vocab_size, (3, model.num_tokens), device="cuda", generator=gen)
            graph.start(cond)
            params = graph.inference_params
            seen = [model.prefill(graph.cond, params)]
            params.advance(1)
            for k in range(model.num_tokens - 1):
                seen.append(graph.step(codes[:, k]).clone())
                params.advance(1)
            forced = model(codes, labels)
            assert (torch.stack(seen, 1) - forced).abs().max().item() <= 1e-4
    clear_decode_graphs(model)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backbone", ["mamba2", "transformer"])
def test_cuda_graph_sampler_matches_eager(backbone):
    model = _tiny(backbone).cuda()
    eager_model = _tiny(backbone, policy=ExecutionPolicy(chunk_size=8, decode_graph=False)).cuda()
    labels = torch.tensor([1, 7, 3, 0], device="cuda")
    graphed, eager = AutoregressiveSampler(), AutoregressiveSampler()
    greedy = dict(cfg_scale=3.0, temperature=0.0, top_k=0, top_p=1.0)
    a = graphed.sample_tokens(model, labels, **greedy)
    assert graphed.last_capture_seconds > 0
    b = graphed.sample_tokens(model, labels, **greedy)
    assert graphed.last_capture_seconds == 0.0  # reused
    assert torch.equal(a, b) and torch.equal(a, eager.sample_tokens(eager_model, labels, **greedy))
    assert eager.last_capture_seconds == 0.0
    with torch.no_grad():  # greedy tokens are the argmax of the guided teacher-forced logits
        forced = model(torch.cat([a, a]), torch.cat([labels, torch.full_like(labels, model.null_class)])).float()
    assert torch.equal((forced[4:] + 3.0 * (forced[:4] - forced[4:])).argmax(-1), a)
    random = dict(cfg_scale=2.0, temperature=1.0, top_k=20, top_p=0.9)
    s1 = graphed.sample_tokens(model, labels, generator=torch.Generator("cuda").manual_seed(0), **random)
    s2 = graphed.sample_tokens(model, labels, generator=torch.Generator("cuda").manual_seed(0), **random)
    s3 = eager.sample_tokens(eager_model, labels, generator=torch.Generator("cuda").manual_seed(0), **random)
    s4 = graphed.sample_tokens(model, labels, generator=torch.Generator("cuda").manual_seed(1), **random)
    assert torch.equal(s1, s2) and torch.equal(s1, s3) and not torch.equal(s1, s4)
    out = generate(model, [3, 1], num_images=5, output="tokens", seed=0, batch_size=2, progress=False)
    again = generate(model, [3, 1], num_images=5, output="tokens", seed=0, batch_size=2, progress=False)
    assert torch.equal(out, again) and out.device.type == "cpu"


@pytest.mark.gpu
@needs_cuda
def test_changed_policy_captures_a_new_graph():
    """Changing gen.policy between runs: the next run captures anew (the graph key holds the
    policy) and samples what the new policy computes; switching back reuses the first graph."""
    model = _tiny("mamba2").cuda()
    labels = torch.tensor([1, 7], device="cuda")
    sampler = AutoregressiveSampler()
    greedy = dict(cfg_scale=2.0, temperature=0.0, top_k=0, top_p=1.0)
    first = sampler.sample_tokens(model, labels, **greedy)
    assert sampler.last_capture_seconds > 0
    policy = model.policy
    model.set_policy(policy.replace(state_update="reference", decode_glue="reference", fold_gated_norm=False))
    second = sampler.sample_tokens(model, labels, **greedy)
    assert sampler.last_capture_seconds > 0
    assert torch.equal(first, second)  # same maths
    model.set_policy(policy)
    sampler.sample_tokens(model, labels, **greedy)
    assert sampler.last_capture_seconds == 0.0


def test_sampler_reads_the_policy_of_the_model(model):
    """Sampling options that are execution settings live in the model's policy, not the config."""
    fields = {f.name for f in dataclasses.fields(AutoregressiveConfig)}
    assert not fields & {"use_cuda_graph", "graph_branches", "fused_sampling"}
    assert isinstance(model.policy, ExecutionPolicy)
    kernel = dataclasses.replace(model.policy, sampling="kernel")
    model.set_policy(kernel)
    try:  # "kernel" on CPU logits is an error, not a silent fallback: the policy was read
        with pytest.raises(ConfigError, match="policy sampling='kernel' needs CUDA"):
            generate(model, [1], output="tokens", seed=0, temperature=1.0, progress=False)
    finally:
        model.set_policy(dataclasses.replace(kernel, sampling="auto"))
