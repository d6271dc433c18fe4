"""DistillationAlgorithm: the student's loss mixes the LM loss with a KD loss against a frozen teacher (`distill`)."""

from __future__ import annotations

import os
from typing import Any

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from drpruning_composer.distill.kd import kd_loss, next_token_mask

TEACHER_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
TEACHER_SHARDING = ('replicated', 'fsdp')


def hf_model(state: State) -> torch.nn.Module:
    """The Hugging Face model inside Composer's wrapper (the student)."""
    return getattr(state.model, 'model', state.model)


def load_teacher(path: str | None, student: torch.nn.Module, dtype: torch.dtype, key: str,
                 sharded: bool = False) -> torch.nn.Module:
    """A frozen Hugging Face model from the local folder `path` (None: the student's own source folder), in `dtype`
    on the student's device (`sharded`: see `shard_teacher`), in eval mode; errors name the YAML `key` that chose it.

    Shared by `distill` (its teacher) and `dro_reweight`'s `reference_loss: teacher` without `distill`.
    """
    from transformers import AutoModelForCausalLM

    path = path or getattr(getattr(student, 'config', None), '_name_or_path', '')
    if not os.path.isfile(os.path.join(path, 'config.json')):
        raise ValueError(f'{key}: {path!r} is not a local Hugging Face model folder (without `teacher`, the '
                         "teacher is the student's model.pretrained_model_name_or_path)")
    teacher = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(f'{key}: {path} has a vocabulary of {teacher.config.vocab_size}, '
                         f'the student {student.config.vocab_size}; the teacher needs the same vocabulary')
    device = next(student.parameters()).device
    teacher = teacher.eval().requires_grad_(False)
    return shard_teacher(teacher, device) if sharded else teacher.to(device)


def shard_teacher(teacher: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The teacher sharded over all ranks with FSDP2 (`fully_shard` on each decoder layer, then on the rest): each
    device keeps 1/world of its weights, and a forward gathers one layer at a time, so every rank must run the
    teacher on the same number of batches (training and evaluation do). Layers move to `device` one at a time as
    they are sharded, so the whole teacher is only ever held in host memory (where `from_pretrained` loads it)."""
    from composer.utils import dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if dist.get_world_size() == 1:
        return teacher.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in getattr(getattr(teacher, 'model', None), 'layers', []):
        fully_shard(layer, mesh=mesh)
    return fully_shard(teacher, mesh=mesh)


class DistillationAlgorithm(Algorithm):
    """Knowledge distillation from a frozen teacher (llm-foundry name: `distill`).

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * LM loss, over the positions the LM loss covers;
    other entries of a loss dict (the pruning Lagrangian) are added unchanged. The teacher is a Hugging Face folder
    (default: the student's own `pretrained_model_name_or_path`, i.e. the model being pruned), loaded at INIT in
    `teacher_dtype`, without gradients or optimizer state, replicated on every rank or, with `teacher_sharding: fsdp`
    for a teacher too large for one device, sharded over the ranks (`shard_teacher`). It is not part of the model, so
    it is neither checkpointed nor wrapped by the student's FSDP. Logged: `loss/train/kd`, `loss/train/lm`.

    Args:
        teacher: local Hugging Face folder of the teacher, or None for the student's source folder.
        alpha: weight of the KD term, in [0, 1] (0: the LM loss alone, the teacher still runs for the log).
        temperature: softmax temperature T > 0 of both distributions.
        chunk_size: positions per chunk of the KD computation (see `kd_loss`).
        teacher_dtype: `float32`, `bfloat16` or `float16`.
        teacher_sharding: `replicated` (a full copy per rank: no communication) or `fsdp` (1/world of the weights per
            rank, gathered layer by layer in each forward).
    """

    def __init__(self, teacher: str | None = None, alpha: float = 0.5, temperature: float = 1.0,
                 chunk_size: int = 1024, teacher_dtype: str = 'float32', teacher_sharding: str = 'replicated') -> None:
        if not 0 <= alpha <= 1:
            raise ValueError(f'algorithms.distill.alpha must be in [0, 1], got {alpha}')
        if not temperature > 0:
            raise ValueError(f'algorithms.distill.temperature must be > 0, got {temperature}')
        if chunk_size < 1:
            raise ValueError(f'algorithms.distill.chunk_size must be >= 1, got {chunk_size}')
        if teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f'algorithms.distill.teacher_dtype must be one of {sorted(TEACHER_DTYPES)}, '
                             f'got {teacher_dtype!r}')
        if teacher_sharding not in TEACHER_SHARDING:
            raise ValueError(f'algorithms.distill.teacher_sharding must be one of {TEACHER_SHARDING}, '
                             f'got {teacher_sharding!r}')
        if teacher is not None and not os.path.isfile(os.path.join(teacher, 'config.json')):
            raise ValueError(f'algorithms.distill.teacher: {teacher} is not a local Hugging Face model folder')
        self.teacher_path = teacher
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.chunk_size = int(chunk_size)
        self.teacher_dtype = TEACHER_DTYPES[teacher_dtype]
        self.sharded = teacher_sharding == 'fsdp'
        self.teacher: torch.nn.Module | None = None

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.AFTER_LOSS)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self.teacher = load_teacher(self.teacher_path, hf_model(state), self.teacher_dtype,
                                        'algorithms.distill.teacher', self.sharded)
        else:
            self._mix_loss(state)

    def _mix_loss(self, state: State) -> None:
        batch = state.batch
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch['input_ids'],
                                          attention_mask=batch.get('attention_mask')).logits
        outputs = state.outputs
        student_logits = outputs['logits'] if isinstance(outputs, dict) else outputs.logits
        kd = kd_loss(student_logits, teacher_logits, next_token_mask(batch['labels']), self.temperature,
                     self.chunk_size)
        loss = state.loss
        if isinstance(loss, dict):
            total = loss['total'] if 'total' in loss else sum(loss.values())
            lm = loss.get('lm', total)
        else:
            total, lm, loss = loss, loss, {}
        # total - alpha * lm + alpha * kd: the LM share becomes (1 - alpha), other terms stay; exact for alpha = 0.
        state.loss = {**loss, 'lm': lm, 'kd': kd, 'total': total + self.alpha * (kd - lm)}

    def state_dict(self) -> dict[str, Any]:
        return {'alpha': self.alpha, 'temperature': self.temperature}
