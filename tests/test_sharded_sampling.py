"""Sampling and scoring on an 8-device (virtual CPU) mesh equal the one-device results.

The base is sharded by the rules table (FSDP, tensor parallel, both), the adapters over the candidate
axis and the batch rows over the batch axes; a child process is needed because the device count
must be set before jax starts.
"""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, "tests")
    from random_lora import random_lora
    from seal_jax import sampling, sharding
    from seal_jax.model import transformer
    from seal_jax.model.config import LoraConfig
    from seal_jax.model.presets import get_preset
    from seal_jax.sampling import SamplingParams, generate
    from seal_jax.scoring import score_sequences

    assert len(jax.devices()) == 8, jax.devices()
    cfg = get_preset("tiny-llama")
    lc = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
    params = transformer.init_params(cfg, jax.random.key(0))
    lora = random_lora(cfg, lc, 8, seed=1)
    rng = np.random.default_rng(0)
    n = 12
    prompts = [rng.integers(3, cfg.vocab_size, int(k)).tolist() for k in rng.integers(2, 20, n)]
    adapter_index = [i % 8 for i in range(n)]
    # Even rows greedy, odd rows nucleus-sampled; ragged lengths so rows are refilled.
    sp = [SamplingParams(temperature=float(i % 2), top_p=0.9, seed=3, stop_ids=(),
                         max_new_tokens=int(m)) for i, m in enumerate(rng.integers(2, 14, n))]
    completions = [rng.integers(3, cfg.vocab_size, int(k)).tolist() for k in rng.integers(1, 9, n)]

    def run(mesh):
        base = generate(params, prompts, cfg=cfg, sampling=sp, batch_size=8, mesh=mesh)
        adapted = generate(params, prompts, cfg=cfg, sampling=sp, lora=lora, lora_cfg=lc,
                           adapter_index=adapter_index, batch_size=8, mesh=mesh)
        scores = score_sequences(params, prompts, completions, cfg=cfg, lora=lora, lora_cfg=lc,
                                 adapter_index=adapter_index, batch_size=8, mesh=mesh)
        return ([g.token_ids for g in base], [g.token_ids for g in adapted],
                scores.sum_logprob.tolist())

    ref = run(None)
    out = {"ref": ref}
    for name, axes in [("candidate8", {"candidate": 8}),
                       ("candidate4_fsdp2", {"candidate": 4, "fsdp": 2}),
                       ("candidate2_fsdp2_tensor2", {"candidate": 2, "fsdp": 2, "tensor": 2})]:
        mesh = sharding.make_mesh({"axes": axes})
        placed, placed_lora = sampling.place_on_mesh(params, sampling.prepare_lora(
            lora, lc, cfg, adapter_index, n)[0], cfg, mesh)
        out[name] = {
            "result": run(mesh),
            "q_spec": [str(a) for a in placed["layers"]["attn"]["q"]["kernel"].sharding.spec],
            "lora_spec": [str(a) for a in jax.tree.leaves(placed_lora)[0].sharding.spec],
        }
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
def test_sharded_sampling_and_scoring_equal_unsharded():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                        " --xla_backend_optimization_level=0").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    sys.path.insert(0, str(REPO / "tests"))
    from tolerances import assert_close_scaled

    base, adapted, scores = out["ref"]
    assert base != adapted, "the adapters changed nothing"
    for name in ("candidate8", "candidate4_fsdp2", "candidate2_fsdp2_tensor2"):
        got_base, got_adapted, got_scores = out[name]["result"]
        # Tokens are discrete: the sharded programs sum in another order, which moves logits by a
        # few float32 ulps, far below the gaps that decide these (random-model) tokens.
        assert got_base == base, name
        assert got_adapted == adapted, name
        assert_close_scaled(got_scores, scores, eps_multiple=64, what=name)
    # The placement really shards: FSDP splits the kernels' embed dim, TP their heads; adapters on K.
    assert out["candidate8"]["q_spec"] == ["None", "None", "None"]
    assert out["candidate4_fsdp2"]["q_spec"] == ["None", "fsdp", "None"]
    assert out["candidate2_fsdp2_tensor2"]["q_spec"] == ["None", "fsdp", "tensor"]
    assert out["candidate8"]["lora_spec"] == ["None", "candidate", "None", "None"]
    assert out["candidate4_fsdp2"]["lora_spec"] == ["None", "('candidate', 'fsdp')", "None", "None"]
