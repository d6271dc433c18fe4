"""Overhead of distillation: the training step with and without the teacher, side by side in one run.

Two llm-foundry `ComposerHFCausalLM` trainers on the same random Llama, the second with `DistillationAlgorithm`
(its teacher: the same model, the default when pruning), batches alternating between them. Per training step:
the median time, and the peak memory above what was held when the step began (CUDA: `max_memory_allocated`;
CPU: the peak resident set size, with large allocations mmapped so that freed memory leaves it). The teacher's
weights stay resident on top of that. E.g. `python bench/distill_overhead.py --hidden 512 --vocab 32000`.
"""

import argparse
import ctypes
import os
import re
import tempfile
from pathlib import Path

import torch
from composer import Trainer
from composer.core import Algorithm, Callback, Event, State
from composer.loggers import Logger
from composer.optim import DecoupledAdamW
from pruning_overhead import CLOCKS, BatchTimer, _train_step_seconds, model_and_random_batches, print_table
from transformers import AutoModelForCausalLM, LlamaConfig

from drpruning_composer.distill.algorithm import DistillationAlgorithm

os.environ.setdefault('HF_HUB_OFFLINE', '1')
M_MMAP_THRESHOLD = -3  # glibc mallopt: a fixed threshold also stops freed blocks from staying in the heap
MIB = 2 ** 20


def _proc_status_bytes(field: str) -> int:
    return 1024 * int(re.search(rf'{field}:\s+(\d+) kB', Path('/proc/self/status').read_text()).group(1))


class PeakMemory(Callback):
    """Bytes each training batch held at its peak above what was held when it started."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.peaks: list[int] = []
        self._start = 0

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BEFORE_TRAIN_BATCH:
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self._start = torch.cuda.memory_allocated()
            else:
                Path('/proc/self/clear_refs').write_text('5')  # resets the peak RSS (VmHWM) to the current RSS
                self._start = _proc_status_bytes('VmRSS')
        elif event == Event.BATCH_END:
            if self.cuda:
                torch.cuda.synchronize()  # also makes the batch timer, which reads the clock next, wait for the GPU
            peak = torch.cuda.max_memory_allocated() if self.cuda else _proc_status_bytes('VmHWM')
            self.peaks.append(peak - self._start)


def _trainer(source_dir: str, args: argparse.Namespace,
             algorithm: Algorithm | None) -> tuple[Trainer, BatchTimer, PeakMemory]:
    model, loader = model_and_random_batches(source_dir, args)
    memory, timer = PeakMemory(args.device == 'gpu'), BatchTimer(CLOCKS[args.clock])
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=f'{args.steps}ba',
                      optimizers=DecoupledAdamW(model.parameters(), lr=1e-4),
                      algorithms=[algorithm] if algorithm else [], callbacks=[memory, timer], device=args.device,
                      precision='amp_bf16' if args.device == 'gpu' else 'fp32', progress_bar=False,
                      log_to_console=False)
    return trainer, timer, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--vocab', type=int, default=4096)
    parser.add_argument('--hidden', type=int, default=256)
    parser.add_argument('--layers', type=int, default=4)
    parser.add_argument('--seq-len', dest='seq', type=int, default=256)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--chunk-size', type=int, default=1024, help='positions per chunk of the KD loss')
    parser.add_argument('--steps', type=int, default=10, help='training steps per trainer')
    parser.add_argument('--warmup-steps', type=int, default=3, help='untimed steps at the start')
    parser.add_argument('--device', choices=('cpu', 'gpu'), default='gpu' if torch.cuda.is_available() else 'cpu',
                        help='gpu: amp_bf16 and a bf16 teacher; cpu: fp32')
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads (1 keeps cpu-clock timings stable)')
    parser.add_argument('--clock', choices=sorted(CLOCKS), help='default: cpu on CPU, wall on GPU')
    args = parser.parse_args()
    args.clock = args.clock or ('wall' if args.device == 'gpu' else 'cpu')
    torch.set_num_threads(args.threads)
    if args.device == 'cpu':
        ctypes.CDLL('libc.so.6').mallopt(M_MMAP_THRESHOLD, 1 << 16)

    heads = max(1, args.hidden // 64)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         intermediate_size=64 * -(-8 * args.hidden // 192), max_position_embeddings=args.seq)
    teacher_dtype = 'bfloat16' if args.device == 'gpu' else 'float32'
    with tempfile.TemporaryDirectory() as tmp:
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)  # the teacher's weights
        distill = DistillationAlgorithm(chunk_size=args.chunk_size, teacher_dtype=teacher_dtype)
        runs = [_trainer(tmp, args, None), _trainer(tmp, args, distill)]
        plain, kd = _train_step_seconds([(trainer, timer) for trainer, timer, _ in runs], args)
        plain_mem, kd_mem = (max(memory.peaks[args.warmup_steps:]) for _, _, memory in runs)
        teacher_bytes = sum(p.numel() * p.element_size() for p in distill.teacher.parameters())

    print(f'Llama: {args.layers} layers, hidden {args.hidden}, {heads} heads, intermediate '
          f'{config.intermediate_size}, vocab {args.vocab}; teacher = the same model in {teacher_dtype}; KD chunk '
          f'{args.chunk_size} positions')
    print(f'batch {args.batch} x seq {args.seq}, {torch.get_num_threads()} threads, device {args.device}, '
          f'{args.clock} clock\n')
    rows = [
        (f'train step ({args.clock} s/batch)', f'{plain:.4f}', f'{kd:.4f}', f'{kd / plain:.2f}'),
        ('step peak memory above its start (MiB)', f'{plain_mem / MIB:.1f}', f'{kd_mem / MIB:.1f}',
         f'{kd_mem / plain_mem:.2f}'),
        ('resident teacher weights (MiB)', '0', f'{teacher_bytes / MIB:.1f}', ''),
    ]
    print_table(('metric', 'LM loss', 'distill', 'ratio'), rows)


if __name__ == '__main__':
    main()
