"""The stages of the GPU check, each run in its own process by `run_check.py` (``--child NAME``).

Every stage is a function `stage(ctx, figures)` that writes what it measures into `figures` as it goes, so that a
failure half-way keeps what was measured before it. Sizes come from `Sizes`: `GPU` (a random-init ~1B Llama) or
`DRY` (a tiny one, for `--dry-run` on CPU). Nothing here is downloaded: models are random-init from a config the
stage writes, data are random words tokenized by a word-level tokenizer the stage writes, through the project's own
`prepare` (MDS shards + manifest).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DOMAINS = ('alpha', 'beta', 'gamma', 'delta')
EOS, PAD, UNK = '<eos>', '<pad>', '<unk>'
H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's H200 SXM bf16 dense peak (no sparsity); a matmul reaches about 790 here


@dataclass(frozen=True)
class Sizes:
    """Model shape, pruning target, data and step counts of one mode of the check."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    target: dict[str, int]
    seq: int
    train_batch: int       # global batch of the `composer train.py` run
    microbatch: int
    train_steps: int
    timing_batch: int      # batch of the timed steps (stage step_timing)
    timing_steps: int      # steps per trainer, the first `timing_warmup` untimed
    timing_warmup: int
    docs_per_domain: int   # random documents of `seq - 1` words: one MDS row each
    real_steps: int        # steps of each real-model pruning run
    real_seq: int
    real_batch: int
    gpu: bool


GPU = Sizes(vocab=32000, hidden=2048, layers=16, heads=16, kv_heads=8, intermediate=7168,
            target=dict(num_hidden_layers=12, hidden_size=1536, num_attention_heads=8, num_key_value_heads=4,
                        intermediate_size=4096),
            seq=2048, train_batch=8, microbatch=4, train_steps=5, timing_batch=8, timing_steps=10, timing_warmup=3,
            docs_per_domain=40, real_steps=200, real_seq=256, real_batch=16, gpu=True)
DRY = Sizes(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
            target=dict(num_hidden_layers=1, hidden_size=48, num_attention_heads=2, num_key_value_heads=1,
                        intermediate_size=64),
            seq=64, train_batch=4, microbatch=2, train_steps=5, timing_batch=4, timing_steps=5, timing_warmup=2,
            docs_per_domain=12, real_steps=6, real_seq=64, real_batch=4, gpu=False)


@dataclass
class Context:
    """What a stage gets: sizes, a scratch folder, the main log (for failure text) and options."""

    sizes: Sizes
    work: Path
    log: Path
    real_model: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------- helpers

def llama_config(s: Sizes) -> dict[str, Any]:
    """The random-init source model's Hugging Face config (Llama, grouped-query attention, untied embeddings)."""
    return {
        'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': s.vocab,
        'hidden_size': s.hidden, 'intermediate_size': s.intermediate, 'num_hidden_layers': s.layers,
        'num_attention_heads': s.heads, 'num_key_value_heads': s.kv_heads, 'head_dim': s.hidden // s.heads,
        'max_position_embeddings': max(s.seq, 2048), 'rms_norm_eps': 1e-5, 'rope_theta': 10000.0,
        'hidden_act': 'silu', 'tie_word_embeddings': False, 'initializer_range': 0.02, 'attention_bias': False,
        'mlp_bias': False, 'bos_token_id': 0, 'eos_token_id': 0, 'pad_token_id': 1, 'torch_dtype': 'float32',
    }


def param_counts(config: dict[str, Any]) -> dict[str, int]:
    """Parameters of a Llama config: total, non-embedding, and `matmul` (all but the input embedding: what 6N uses)."""
    h, i, L, v = config['hidden_size'], config['intermediate_size'], config['num_hidden_layers'], config['vocab_size']
    d = config.get('head_dim') or h // config['num_attention_heads']
    attn = h * d * config['num_attention_heads'] * 2 + h * d * config['num_key_value_heads'] * 2
    layer = attn + 3 * h * i + 2 * h
    non_embedding = L * layer + h
    embedding = v * h
    head = 0 if config.get('tie_word_embeddings') else v * h
    return {'total': non_embedding + embedding + head, 'non_embedding': non_embedding,
            'matmul': non_embedding + v * h}


def train_flops_per_token(config: dict[str, Any], seq: int) -> float:
    """Model FLOPs of one trained token: 6 N (N: every parameter used in a matmul, the LM head included, the input
    embedding not) + 12 L s (heads * head_dim) for the attention scores and weighted sum (forward + backward, no
    causal halving, no recomputation: the PaLM appendix B convention)."""
    d = config.get('head_dim') or config['hidden_size'] // config['num_attention_heads']
    attention = 12 * config['num_hidden_layers'] * seq * config['num_attention_heads'] * d
    return 6.0 * param_counts(config)['matmul'] + attention


def write_word_tokenizer(out: Path, vocab: int) -> None:
    """A word-level tokenizer whose word `w{i}` is token i (0: EOS, 1: pad, 2: unknown), as a Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {EOS: 0, PAD: 1, UNK: 2, **{f'w{i}': i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   model_max_length=1 << 20, model_input_names=['input_ids', 'attention_mask'])
    fast.save_pretrained(str(out))


def write_random_corpus(out: Path, vocab: int, words_per_doc: int, docs: int, seed: int = 0) -> dict[str, Path]:
    """One jsonl file of random-word documents per domain; domain k draws words from a Zipf law of exponent
    0.6 + 0.3 k over its own shuffled vocabulary, so the domains differ in difficulty."""
    rng = np.random.default_rng(seed)
    sources = {}
    for k, domain in enumerate(DOMAINS):
        ids = rng.permutation(np.arange(3, vocab))
        p = 1.0 / np.arange(1, len(ids) + 1) ** (0.6 + 0.3 * k)
        words = rng.choice(ids, size=(docs, words_per_doc), p=p / p.sum())
        (out / domain).mkdir(parents=True, exist_ok=True)
        with open(out / domain / 'part-00000.jsonl', 'w') as f:
            for row in words:
                f.write(json.dumps({'text': ' '.join(f'w{i}' for i in row)}) + '\n')
        sources[domain] = out / domain
    return sources


def write_source_model(root: Path, s: Sizes) -> Path:
    """A config-only Hugging Face folder (random init via `pretrained: false`) with the word-level tokenizer."""
    model = root / 'source'
    model.mkdir(parents=True, exist_ok=True)
    (model / 'config.json').write_text(json.dumps(llama_config(s), indent=2) + '\n')
    write_word_tokenizer(model, s.vocab)
    return model


def write_random_data(root: Path, tokenizer: Path, s: Sizes) -> Path:
    """MDS shards per domain and split (`drpruning_composer.data.prepare.prepare`) of random-word documents."""
    from drpruning_composer.data.prepare import prepare

    sources = write_random_corpus(root / 'corpus', s.vocab, s.seq - 1, s.docs_per_domain)
    prepare(sources, tokenizer, root / 'data', max_seq_len=s.seq, val_fraction=0.2, seed=17, overwrite=True)
    return root / 'data'


def last_tracebacks(text: str, limit: int = 6000) -> str:
    """The last Python traceback in `text` through to its end (or the text's tail when there is none), at most
    `limit` characters: what a failed stage reports as its error."""
    start = text.rfind('Traceback (most recent call last)')
    tail = text[start:] if start >= 0 else text
    return tail[-limit:].strip()


def run_composer_train(yaml: Path, log: Path, timeout: float | None = None) -> float:
    """`composer train.py YAML` from the repo root (output appended to `log`); its wall time in seconds. Raises with
    the run's last traceback when it fails."""
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1', 'PYTHONUNBUFFERED': '1',
           'PYTHONPATH': os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')]))}
    cmd = [sys.executable, '-m', 'composer.cli.launcher', str(REPO / 'train.py'), str(yaml)]
    offset = log.stat().st_size if log.exists() else 0
    start = time.perf_counter()
    with open(log, 'a') as out:
        out.write(f'$ {" ".join(cmd)}\n')
        out.flush()
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
    wall = time.perf_counter() - start
    if code:
        with open(log, errors='replace') as f:
            f.seek(offset)
            raise RuntimeError(f'composer train.py {yaml.name} exited with code {code}:\n{last_tracebacks(f.read())}')
    return wall


def prune_yaml(s: Sizes, model: Path, data: Path, run: Path, domains: list[str], update: str = 'dro',
               pretrained: bool = False, steps: int | None = None, seq: int | None = None,
               batch: int | None = None, microbatch: int | None = None) -> dict[str, Any]:
    """A DRPruning run as `yamls/demo/prune.yaml` writes it (l0_mask + dro_reweight + dynamic_mixture, one eval
    loader per domain), for GPU (amp_bf16, FSDP1 FULL_SHARD, use_orig_params, activation checkpointing) or CPU
    (fp32, no fsdp_config)."""
    seq, batch = seq or s.seq, batch or s.train_batch
    microbatch, steps = microbatch or s.microbatch, steps or s.train_steps
    loader = {'drop_last': False, 'num_workers': 0, 'prefetch_factor': None, 'persistent_workers': False}
    cfg: dict[str, Any] = {
        'run_name': f'gpu-check-{run.name}',
        'seed': 17,
        'max_seq_len': seq,
        'model': {'name': 'hf_causal_lm', 'pretrained_model_name_or_path': str(model), 'pretrained': pretrained,
                  'attn_implementation': 'sdpa'},
        'tokenizer': {'name': str(model), 'kwargs': {'model_max_length': seq}},
        'train_loader': {'name': 'dynamic_mixture', **loader, 'drop_last': True,
                         'dataset': {'local': str(data), 'domains': domains, 'proportions': 'natural',
                                     'split': 'train', 'max_seq_len': seq, 'seed': 17}},
        'eval_loader': [{'name': 'text', 'label': d, **loader,
                         'dataset': {'local': f'{data}/{d}', 'split': 'val', 'shuffle': False, 'max_seq_len': seq}}
                        for d in domains],
        'eval_interval': f'{max(1, steps // 3)}ba',
        'eval_first': False,
        'eval_subset_num_batches': 2,
        'algorithms': {
            'l0_mask': {'target': dict(s.target), 'lagrangian_warmup': f'{max(1, steps // 2)}ba', 'mask_lr': 0.1,
                        'lagrangian_lr': 0.1, 'eval_mode': 'soft', 'constraint': 'per_layer',
                        'hard_finish': '0.2dur', 'export_dir': str(run / 'pruned_hf')},
            'gradient_clipping': {'clipping_type': 'norm', 'clipping_threshold': 1.0},
        },
        'callbacks': {
            'dro_reweight': {'domains': domains, 'update': update, 'rho': 0.1, 'min_prob': 0.2,
                             'reference_loss': 'dynamic', 'reference_ratio': 'dynamic',
                             'history_folder': str(run / 'dro')},
            'speed_monitor': {'window_size': 1},
        },
        'optimizer': {'name': 'decoupled_adamw', 'lr': 1.0e-4, 'betas': [0.9, 0.95], 'eps': 1.0e-8,
                      'weight_decay': 0.0},
        'scheduler': {'name': 'cosine_with_warmup', 't_warmup': '1ba', 'alpha_f': 0.1},
        'max_duration': f'{steps}ba',
        'global_train_batch_size': batch,
        'device_train_microbatch_size': microbatch,
        'device_eval_batch_size': microbatch,
        'precision': 'amp_bf16' if s.gpu else 'fp32',
        'progress_bar': False,
        'log_to_console': True,
        'console_log_interval': '1ba',
        'python_log_level': 'info',
    }
    if s.gpu:
        cfg['callbacks']['memory_monitor'] = {}
        cfg['fsdp_config'] = {'sharding_strategy': 'FULL_SHARD', 'mixed_precision': 'DEFAULT',
                              'activation_checkpointing': True, 'activation_cpu_offload': False,
                              'limit_all_gathers': True, 'use_orig_params': True, 'state_dict_type': 'full'}
    return cfg


def write_yaml(cfg: dict[str, Any], path: Path) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def device() -> str:
    import torch

    return 'cuda' if torch.cuda.is_available() else 'cpu'


def finite(x: float) -> float | None:
    """`x` as a float, or None when it is not finite (JSON has no NaN)."""
    x = float(x)
    return x if math.isfinite(x) else None


# ----------------------------------------------------------------------------------------------------------- stages

def stage_imports(ctx: Context, figures: dict[str, Any]) -> None:
    """Import the stack and this project, register its components; record versions, file locations and the GPU."""
    import importlib

    start = time.perf_counter()
    modules = {}
    for name in ('torch', 'composer', 'llmfoundry', 'streaming', 'transformers', 'tokenizers', 'huggingface_hub',
                 'numpy', 'safetensors', 'omegaconf', 'datasets', 'drpruning_composer'):
        module = importlib.import_module(name)
        modules[name] = {'version': getattr(module, '__version__', None), 'file': getattr(module, '__file__', None)}
    from llmfoundry import registry

    from drpruning_composer.registry import COMPONENTS, register_components

    register_components()
    missing = [f'{r}.{n}' for r, comps in COMPONENTS.items() for n in comps if n not in getattr(registry, r)]
    if missing:
        raise RuntimeError(f'components not registered: {missing}')
    import torch

    env: dict[str, Any] = {'modules': modules, 'torch_cuda': torch.version.cuda,
                           'cuda_available': torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_name=props.name, gpu_count=torch.cuda.device_count(),
                   gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   capability=f'{props.major}.{props.minor}', bf16_supported=torch.cuda.is_bf16_supported())
    ctx.extra['environment'] = env
    figures['import_s'] = time.perf_counter() - start


def stage_train_1b(ctx: Context, figures: dict[str, Any]) -> None:
    """`composer train.py` of a random-init Llama pruned by l0_mask with dro_reweight over dynamic_mixture."""
    s = ctx.sizes
    root = ctx.work / 'train'
    start = time.perf_counter()
    model = write_source_model(root, s)
    data = write_random_data(root, model, s)
    figures['data_s'] = time.perf_counter() - start
    config = llama_config(s)
    figures.update(params=param_counts(config)['total'], non_embedding_params=param_counts(config)['non_embedding'])
    run = root / 'run'
    yaml = write_yaml(prune_yaml(s, model, data, run, list(DOMAINS)), root / 'prune.yaml')
    figures['train_wall_s'] = run_composer_train(yaml, ctx.log)
    exported = json.loads((run / 'pruned_hf' / 'config.json').read_text())
    figures['export_shape_ok'] = all(exported[k] == v for k, v in s.target.items())
    figures['exported_params'] = param_counts(exported)['total']
    history = (run / 'dro' / 'history.csv').read_text().splitlines()
    figures['dro_history_rows'] = len(history) - 1
    if not figures['export_shape_ok']:
        raise RuntimeError(f'exported shape {exported} differs from the target {s.target}')


def stage_step_timing(ctx: Context, figures: dict[str, Any]) -> None:
    """Step time, tokens/s, MFU and peak memory of plain, masked (l0_mask) and distilled (distill) training steps
    of the random-init model: three Composer trainers, one device, batches alternating between them."""
    import ctypes

    import torch
    from composer import Trainer
    from composer.optim import DecoupledAdamW
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(REPO / 'bench'))
    from distill_overhead import M_MMAP_THRESHOLD, PeakMemory
    from pruning_overhead import BatchTimer, _train_step_seconds, model_and_random_batches

    from drpruning_composer import L0MaskAlgorithm
    from drpruning_composer.distill.algorithm import DistillationAlgorithm

    s = ctx.sizes
    gpu = device() == 'cuda'
    if not gpu:
        ctypes.CDLL('libc.so.6').mallopt(M_MMAP_THRESHOLD, 1 << 16)  # freed memory leaves the RSS (PeakMemory)
    root = ctx.work / 'timing'
    config = llama_config(s)
    source = root / 'source'
    source.mkdir(parents=True, exist_ok=True)
    (source / 'config.json').write_text(json.dumps(config) + '\n')
    teacher = root / 'teacher'
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(LlamaConfig(**config), torch_dtype=torch.bfloat16).save_pretrained(teacher)
    args = SimpleNamespace(vocab=s.vocab, steps=s.timing_steps, batch=s.timing_batch, seq=s.seq,
                           warmup_steps=s.timing_warmup)
    teacher_dtype = 'bfloat16' if gpu else 'float32'
    algorithms = {'plain': None,
                  'masked': L0MaskAlgorithm(target=dict(s.target)),
                  'distill': DistillationAlgorithm(teacher=str(teacher), teacher_dtype=teacher_dtype)}
    runs = []
    for name, algorithm in algorithms.items():
        model, loader = model_and_random_batches(str(source), args)
        timer, memory = BatchTimer(time.perf_counter), PeakMemory(gpu)
        trainer = Trainer(model=model, train_dataloader=loader, max_duration=f'{s.timing_steps}ba',
                          optimizers=DecoupledAdamW(model.parameters(), lr=1e-4),
                          algorithms=[algorithm] if algorithm else [], callbacks=[memory, timer],
                          device='gpu' if gpu else 'cpu', precision='amp_bf16' if gpu else 'fp32',
                          progress_bar=False, log_to_console=False)
        runs.append((name, trainer, timer, memory))
    seconds = _train_step_seconds([(trainer, timer) for _, trainer, timer, _ in runs], args)
    tokens = s.timing_batch * s.seq
    flops = train_flops_per_token(config, s.seq) * tokens
    figures.update(batch=s.timing_batch, seq=s.seq, timed_steps=s.timing_steps - s.timing_warmup,
                   peak_tflops=H200_BF16_DENSE_TFLOPS, model_tflop_per_step=flops / 1e12,
                   precision='amp_bf16' if gpu else 'fp32', device='gpu' if gpu else 'cpu')
    for (name, _, _, memory), step_s in zip(runs, seconds):
        peak = max(memory.peaks[s.timing_warmup:])
        figures[name] = {'step_s': step_s, 'tokens_per_s': tokens / step_s,
                         'mfu': flops / step_s / (H200_BF16_DENSE_TFLOPS * 1e12),
                         'step_peak_memory_gib': peak / 2 ** 30}
    for name in ('masked', 'distill'):
        figures[f'{name}_over_plain'] = {
            'step_time': figures[name]['step_s'] / figures['plain']['step_s'],
            'step_peak_memory': finite(figures[name]['step_peak_memory_gib'] / figures['plain']['step_peak_memory_gib'])
            if figures['plain']['step_peak_memory_gib'] > 0 else None}
    if gpu:  # what stays resident: three models with their optimizer states, and the teacher
        figures['resident_memory_gib'] = torch.cuda.memory_allocated() / 2 ** 30


def stage_export_equivalence(ctx: Context, figures: dict[str, Any]) -> None:
    """The masked model under its final (target) masks against the exported compact model: max abs logit
    difference in fp32 and with bf16 weights (the mask logits stay fp32 so both pick the same units)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from drpruning_composer.pruning.attach import attach_masks, bias_layout
    from drpruning_composer.pruning.export import export_pruned_model
    from drpruning_composer.pruning.masks import L0Masks
    from drpruning_composer.pruning.structure import MASK_TYPES, ModelShape, resolve_target

    s = ctx.sizes
    dev = torch.device(device())
    config = LlamaConfig(**llama_config(s))
    torch.manual_seed(0)
    with dev:
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32, attn_implementation='sdpa')
    with torch.no_grad():  # norm weights away from 1, so that a wrong norm statistic shows
        for name, p in model.named_parameters():
            if name.endswith('norm.weight'):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    source = ModelShape.from_config(config)
    masks = L0Masks(source, resolve_target(source, s.target), MASK_TYPES, bias_layout(model), eval_mode='target',
                    device=dev)
    with torch.no_grad():
        for p in masks.log_alpha.values():
            p.copy_(3.0 * torch.randn_like(p))
    attach_masks(model, masks)
    model.eval()
    out = export_pruned_model(model.state_dict(), config.to_dict(), s.target, ctx.work / 'export' / 'pruned',
                              overwrite=True)
    tokens = torch.randint(0, s.vocab, (2, min(s.seq, 512)), device=dev)
    for dtype, label in ((torch.float32, 'fp32'), (torch.bfloat16, 'bf16')):
        model.to(dtype)
        masks.float()
        pruned = AutoModelForCausalLM.from_pretrained(out, torch_dtype=dtype, attn_implementation='sdpa').to(dev)
        with torch.no_grad():
            a, b = model(tokens).logits.float(), pruned.eval()(tokens).logits.float()
        figures[label] = {'max_abs_diff': (a - b).abs().max().item(), 'max_abs_logit': a.abs().max().item(),
                          'mean_abs_diff': (a - b).abs().mean().item()}
        del pruned
    figures['pruned_shape'] = dict(s.target)
    figures['tokens'] = list(tokens.shape)
    if figures['fp32']['max_abs_diff'] > 1e-3 * max(1.0, figures['fp32']['max_abs_logit']):
        raise RuntimeError(f"fp32 export differs from the masked model: {figures['fp32']}")


def real_target(config: dict[str, Any]) -> dict[str, int]:
    """About half of a real model: 2/3 of the layers and KV groups (query heads per group kept), 3/4 of the hidden
    size and 2/3 of the MLP channels, rounded down to multiples of 64."""
    kv = config.get('num_key_value_heads') or config['num_attention_heads']
    group = config['num_attention_heads'] // kv
    kv_target = max(1, 2 * kv // 3)
    return {'num_hidden_layers': max(1, 2 * config['num_hidden_layers'] // 3),
            'hidden_size': max(64, 3 * config['hidden_size'] // 4 // 64 * 64),
            'num_attention_heads': kv_target * group, 'num_key_value_heads': kv_target,
            'intermediate_size': max(64, 2 * config['intermediate_size'] // 3 // 64 * 64)}


def domain_losses(model_dir: Path, data: Path, domains: list[str], max_samples: int, batch: int) -> dict[str, float]:
    """Mean next-token loss of a Hugging Face folder on each domain's first `max_samples` val rows (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from drpruning_composer.evaluate import read_split

    dev = torch.device(device())
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).to(dev).eval()
    losses = {}
    for d in domains:
        rows = torch.from_numpy(read_split(data, d, 'val', max_samples))
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(rows), batch):
                x = rows[i:i + batch].to(dev)
                logits = model(input_ids=x).logits[:, :-1].float()
                total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(),
                                                           reduction='sum').item()
                count += x[:, 1:].numel()
        losses[d] = total / count
    return losses


def stage_real_model(ctx: Context, figures: dict[str, Any]) -> None:
    """A real model (`--real-model`, a Hugging Face folder with a tokenizer) pruned to about half with DRO and with a
    constant mixture, on the demo corpus's four domains (files of this Python installation) tokenized by the
    model's own tokenizer; per-domain val losses of the source and both exports."""
    from drpruning_composer.data.demo_corpus import DOMAINS as CORPUS_DOMAINS
    from drpruning_composer.data.demo_corpus import write_corpus
    from drpruning_composer.data.prepare import prepare

    s = ctx.sizes
    source = ctx.real_model
    root = ctx.work / 'real'
    start = time.perf_counter()
    write_corpus(root / 'corpus', scale=0.25 if s.gpu else 0.1)
    prepare({d: root / 'corpus' / d for d in CORPUS_DOMAINS}, source, root / 'data', max_seq_len=s.real_seq,
            val_fraction=0.1, seed=17, overwrite=True)
    figures['data_s'] = time.perf_counter() - start
    config = json.loads((source / 'config.json').read_text())
    target = real_target(config)
    figures['target'] = target
    sizes = dataclasses.replace(s, target=target)
    domains = list(CORPUS_DOMAINS)
    max_samples = 64 if s.gpu else 4
    figures['source_loss'] = domain_losses(source, root / 'data', domains, max_samples, s.real_batch)
    for update in ('dro', 'constant'):
        run = root / update
        cfg = prune_yaml(sizes, source, root / 'data', run, domains, update=update, pretrained=True,
                         steps=s.real_steps, seq=s.real_seq, batch=s.real_batch, microbatch=s.real_batch)
        cfg['eval_interval'] = f'{max(1, s.real_steps // 20)}ba'
        cfg.pop('fsdp_config', None)  # one device and 135M parameters: no sharding needed
        wall = run_composer_train(write_yaml(cfg, run / 'prune.yaml'), ctx.log)
        losses = domain_losses(run / 'pruned_hf', root / 'data', domains, max_samples, s.real_batch)
        figures[update] = {'wall_s': wall, 'export_loss': losses, 'mean_loss': float(np.mean(list(losses.values()))),
                           'worst_loss': max(losses.values())}
    figures['eval_samples_per_domain'] = max_samples


STAGES: dict[str, Callable[[Context, dict[str, Any]], None]] = {
    'imports': stage_imports,
    'train_1b': stage_train_1b,
    'step_timing': stage_step_timing,
    'export_equivalence': stage_export_equivalence,
    'real_model': stage_real_model,
}


def run_stage(name: str, ctx: Context, result_path: Path) -> int:
    """Run one stage and write {figures, error, environment?} to `result_path`, also when it fails; exit code."""
    figures: dict[str, Any] = {}
    error = None
    try:
        STAGES[name](ctx, figures)
    except BaseException as e:  # noqa: BLE001 - every failure is a result to report
        error = f'{type(e).__name__}: {e}\n\n{traceback.format_exc()[-4000:]}'
        traceback.print_exc()
    result = {'figures': figures, 'error': error}
    if 'environment' in ctx.extra:
        result['environment'] = ctx.extra['environment']
    result_path.write_text(json.dumps(result, indent=2, default=str) + '\n')
    return 0 if error is None else 1
