"""Overhead of L0 pruning and speed of the pruned model, in one run.

1. Training step time of llm-foundry's `ComposerHFCausalLM` with `L0MaskAlgorithm` vs without (median per batch).
2. Forward tokens/s of the exported pruned model vs the source, next to their non-embedding parameter ratio.

Defaults are a small random Llama that runs on CPU in about a minute; flags select bigger shapes, e.g.
`python bench/pruning_overhead.py --hidden 1024 --layers 8 --heads 16 --kv-heads 4 --intermediate 2816`, or the
shape of a Hugging Face folder (random weights: speed does not depend on them), e.g. the real model's:
`python bench/pruning_overhead.py --config demo_real/source --target-layers 20 --target-hidden 448 --target-heads 6
--target-kv-heads 3 --target-intermediate 1024 --batch 4 --seq 256`. Also the peak memory of a training step above
what was held when it began (CPU: peak resident set size; see bench/distill_overhead.py).
"""

import argparse
import ctypes
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from composer import Trainer
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.optim import DecoupledAdamW
from llmfoundry.models.hf import ComposerHFCausalLM
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from drpruning_composer import L0MaskAlgorithm

os.environ.setdefault('HF_HUB_OFFLINE', '1')
# 'cpu' (process CPU time, all threads) is robust to other jobs sharing the machine; 'wall' is what a user waits.
CLOCKS = {'cpu': time.process_time, 'wall': time.perf_counter}


class BatchTimer(Callback):
    """Wall time of every training batch."""

    def __init__(self, clock):
        self.clock = clock
        self.seconds: list[float] = []
        self._start = 0.0

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BEFORE_TRAIN_BATCH:
            self._start = self.clock()
        elif event == Event.BATCH_END:
            self.seconds.append(self.clock() - self._start)


def _non_embedding_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters()
               if 'embed_tokens' not in n and 'lm_head' not in n and 'l0_masks' not in n)


def model_and_random_batches(source_dir: str, args: argparse.Namespace) -> tuple[ComposerHFCausalLM, DataLoader]:
    """The random-init model of `source_dir` (seed 0) and `args.steps` batches of random tokens as LM examples."""
    torch.manual_seed(0)
    model = ComposerHFCausalLM(tokenizer=None, pretrained_model_name_or_path=source_dir, pretrained=False,
                               use_train_metrics=False, attn_implementation='sdpa')
    tokens = torch.randint(0, args.vocab, (args.steps * args.batch, args.seq))
    loader = DataLoader([{'input_ids': t, 'attention_mask': torch.ones_like(t), 'labels': t} for t in tokens],
                        batch_size=args.batch)
    return model, loader


def _trainer(source_dir: str, args: argparse.Namespace,
             algorithm: L0MaskAlgorithm | None) -> tuple[Trainer, BatchTimer]:
    model, loader = model_and_random_batches(source_dir, args)
    timer = BatchTimer(CLOCKS[args.clock])
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=f'{args.steps}ba',
                      optimizers=DecoupledAdamW(model.parameters(), lr=1e-4),
                      algorithms=[algorithm] if algorithm else [],
                      callbacks=[timer], device='cpu', precision='fp32', progress_bar=False, log_to_console=False)
    return trainer, timer


def _train_step_seconds(trainers: list[tuple[Trainer, BatchTimer]], args: argparse.Namespace) -> list[float]:
    """Median batch time of each trainer; batches alternate between trainers so CPU contention hits all alike."""
    for _ in range(args.steps):
        for trainer, _ in trainers:
            trainer.fit(duration='1ba')
    for trainer, _ in trainers:
        trainer.close()
    return [statistics.median(timer.seconds[args.warmup_steps:]) for _, timer in trainers]


def _forward_tokens_per_second(models: list[torch.nn.Module], args: argparse.Namespace) -> list[float]:
    """Median forward throughput of each model, alternating between models on every repetition."""
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq))
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for _ in range(args.warmup_steps + args.forward_reps):
            for model, model_times in zip(models, times):
                model.eval()
                start = CLOCKS[args.clock]()
                model(tokens)
                model_times.append(CLOCKS[args.clock]() - start)
    return [tokens.numel() / statistics.median(t[args.warmup_steps:]) for t in times]


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Left-aligned columns separated by `|`, a dashed line under the header."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple('-' * w for w in widths), *rows]:
        print(' | '.join(cell.ljust(w) for cell, w in zip(row, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--vocab', type=int, default=1024)
    parser.add_argument('--hidden', type=int, default=256)
    parser.add_argument('--layers', type=int, default=4)
    parser.add_argument('--heads', type=int, default=8)
    parser.add_argument('--kv-heads', type=int, default=4)
    parser.add_argument('--intermediate', type=int, default=704)
    parser.add_argument('--target-layers', type=int, help='default: 3/4 of the layers')
    parser.add_argument('--target-hidden', type=int, help='default: 3/4 of hidden')
    parser.add_argument('--target-kv-heads', type=int, help='default: half the KV heads (group size kept)')
    parser.add_argument('--target-intermediate', type=int, help='default: half the intermediate size')
    parser.add_argument('--target-heads', type=int, help='default: the target KV heads x the source group size')
    parser.add_argument('--config', help='Hugging Face folder whose config.json gives the source shape (and vocab)')
    parser.add_argument('--seq', type=int, default=128)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--steps', type=int, default=12, help='training steps per run')
    parser.add_argument('--forward-reps', type=int, default=10)
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads (1 keeps cpu-clock timings stable)')
    parser.add_argument('--clock', choices=sorted(CLOCKS), default='cpu', help='what the timings measure')
    parser.add_argument('--warmup-steps', type=int, default=3, help='untimed steps / forwards at the start')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.config:
        config = AutoConfig.from_pretrained(args.config)
        config.max_position_embeddings = max(args.seq, config.max_position_embeddings)
        args.vocab, args.hidden, args.layers = config.vocab_size, config.hidden_size, config.num_hidden_layers
        args.heads, args.kv_heads, args.intermediate = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.intermediate_size)
        config.torch_dtype = torch.float32
    else:
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                             num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                             intermediate_size=args.intermediate, max_position_embeddings=args.seq)
    group = args.heads // args.kv_heads
    kv_heads = args.target_kv_heads or max(1, args.kv_heads // 2)
    target = dict(num_hidden_layers=args.target_layers or max(1, 3 * args.layers // 4),
                  hidden_size=args.target_hidden or 3 * args.hidden // 4,
                  num_attention_heads=args.target_heads or kv_heads * group, num_key_value_heads=kv_heads,
                  intermediate_size=args.target_intermediate or args.intermediate // 2)
    from distill_overhead import M_MMAP_THRESHOLD, MIB, PeakMemory  # it imports this module's helpers

    ctypes.CDLL('libc.so.6').mallopt(M_MMAP_THRESHOLD, 1 << 16)  # freed memory leaves the RSS (PeakMemory)

    with tempfile.TemporaryDirectory() as tmp:
        source_dir, export_dir = str(Path(tmp) / 'source'), str(Path(tmp) / 'pruned')
        config.save_pretrained(source_dir)
        trainers = [_trainer(source_dir, args, None),
                    _trainer(source_dir, args, L0MaskAlgorithm(target=target, export_dir=export_dir))]
        memories = [PeakMemory(cuda=False) for _ in trainers]
        for (trainer, _), memory in zip(trainers, memories):
            trainer.state.callbacks.append(memory)
        plain, masked = _train_step_seconds(trainers, args)
        plain_mem, masked_mem = (max(m.peaks[args.warmup_steps:]) / MIB for m in memories)
        torch.manual_seed(0)
        source = AutoModelForCausalLM.from_config(config, attn_implementation='sdpa')
        pruned = AutoModelForCausalLM.from_pretrained(export_dir, attn_implementation='sdpa')
        source_tps, pruned_tps = _forward_tokens_per_second([source, pruned], args)
        source_params, pruned_params = _non_embedding_params(source), _non_embedding_params(pruned)

    print(f'source: {config.num_hidden_layers} layers, hidden {config.hidden_size}, heads {config.num_attention_heads}'
          f'/{config.num_key_value_heads} kv, intermediate {config.intermediate_size}; target: {target}')
    print(f'batch {args.batch} x seq {args.seq}, {torch.get_num_threads()} threads, device cpu, {args.clock} clock\n')
    rows = [
        (f'train step ({args.clock} s/batch)', f'{plain:.4f}', f'{masked:.4f}', f'{masked / plain:.3f}'),
        (f'forward (tokens/{args.clock} s)', f'{source_tps:.0f}', f'{pruned_tps:.0f}',
         f'{pruned_tps / source_tps:.3f}'),
        ('train step peak memory above its start (MiB)', f'{plain_mem:.1f}', f'{masked_mem:.1f}',
         f'{masked_mem / plain_mem:.3f}'),
        ('non-embedding params', f'{source_params}', f'{pruned_params}', f'{pruned_params / source_params:.3f}'),
    ]
    print_table(('metric', 'plain / source', 'masked / pruned', 'ratio'), rows)


if __name__ == '__main__':
    main()
