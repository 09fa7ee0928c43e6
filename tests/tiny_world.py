"""A complete tiny SEAL world for fast end-to-end tests: a byte-level tokenizer with ChatML specials, a
random tiny Llama whose vocabulary matches it, and a knowledge Experiment over a few embedded passages.
"""
from __future__ import annotations

import json
import pathlib

import ml_collections
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from seal_jax import inner, sft
from seal_jax.checkpoints import RecordLog, RunCheckpointer
from seal_jax.model.config import LoraConfig
from seal_jax.model.presets import get_preset
from seal_jax.model.tokenizer import Tokenizer
from seal_jax.model.transformer import init_params
from seal_jax.engine import Engine, EngineSettings
from seal_jax.rest_em import round_config
from seal_jax.tasks.knowledge.data import load_embedded_corpus
from seal_jax.tasks.knowledge.domain import KnowledgeDomain, KnowledgeSettings
from seal_jax.tasks.knowledge.experiments import KnowledgeExperiment
from seal_jax.tasks.knowledge.graders import LexicalGrader

REPO = pathlib.Path(__file__).resolve().parents[1]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens + <|endoftext|>, <|im_start|>, <|im_end|> (ids 256, 257, 258)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return Tokenizer(tok, eos_id=256, pad_id=256, add_bos=False, chat_template=CHATML, name="bytes")


def tiny_model(seed: int = 0):
    cfg = get_preset("tiny-llama").replace(vocab_size=320, eos_token_id=256, pad_token_id=256,
                                                 max_position_embeddings=2048)
    import jax

    return cfg, init_params(cfg, jax.random.key(seed))


def write_tiny_model_dir(path: pathlib.Path) -> pathlib.Path:
    """A random tiny Llama + byte-level tokenizer as an HF folder the CLI can load."""
    from seal_jax.model.hf import save_hf_checkpoint

    path.mkdir(parents=True, exist_ok=True)
    cfg, params = tiny_model()
    save_hf_checkpoint(path, cfg, params)
    byte_tokenizer()._tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}))
    return path


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    from seal_jax.config import load_config

    c = load_config(str(REPO / "configs" / "knowledge.py") + ":demo")
    c.progress = False
    c.self_edit.k = 2
    c.self_edit.max_new_tokens = 12
    c.eval.max_new_tokens = 6
    c.rest_em.rounds = 1
    c.rest_em.passages_per_round = 2
    c.rest_em.sft.batch_size = 2
    c.rest_em.sft.microbatches = 1
    c.rest_em.sft.rank = 4
    c.rest_em.sft.alpha = 8.0
    c.candidates_per_call = 4
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def tiny_experiment(run_dir: pathlib.Path, config=None, *, n_train=2, n_eval=2) -> KnowledgeExperiment:
    c = config or tiny_config()
    cfg, params = tiny_model()
    tok = byte_tokenizer()
    inner_cfg = inner.InnerConfig(epochs=1, append_eos=True, length_buckets=(512, 1024, 2048),
                                  steps_per_chunk=8)
    settings = EngineSettings(lora=LoraConfig(rank=4, alpha=8.0), inner=inner_cfg,
                              candidates_per_call=int(c.candidates_per_call), eval_batch_size=16)
    engine = Engine(cfg, params, tok, settings)
    domain = KnowledgeDomain(tok, LexicalGrader(), KnowledgeSettings(
        chat=True, max_sequence_tokens=400, answer_max_new_tokens=int(c.eval.max_new_tokens)))
    passages = load_embedded_corpus()
    sft_cfg = sft.SFTConfig.from_fields(lora=LoraConfig(rank=4, alpha=8.0, targets=("q", "v")),
                                        batch_size=2, microbatches=1, epochs=1,
                                        length_buckets=(512, 1024, 2048))

    def m_step(params, examples):
        return sft.train_policy(params, examples, cfg=cfg, sft_cfg=sft_cfg, eos_id=tok.eos_id)

    run_dir.mkdir(parents=True, exist_ok=True)
    return KnowledgeExperiment(
        config=c, engine=engine, domain=domain, train_contexts=passages[:n_train],
        eval_contexts=passages[n_train:n_train + n_eval], run_dir=run_dir,
        records=RecordLog(run_dir / "records.jsonl"),
        checkpointer=RunCheckpointer(run_dir / "checkpoints", max_to_keep=None),
        round=round_config(c, contexts_per_round=int(c.rest_em.passages_per_round)), m_step=m_step,
        progress=bool(c.progress))
