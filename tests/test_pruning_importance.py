"""`init: importance`: masks from activation importance, one-shot pruning, resume during calibration, and the
warning when the hard finish would cut a model that is still far above the target size."""

import logging

import pytest
import torch
from composer.core import Callback, Event, State
from composer.core import Time
from composer.loggers import InMemoryLogger, Logger
from safetensors.torch import load_file
from test_pruning_training import CONFIG, TARGET, _algorithm, _mask_state, _trainer
from transformers import AutoModelForCausalLM, LlamaConfig

from drpruning_composer.pruning.importance import ImportanceCollector, importance_log_alpha
from drpruning_composer.pruning.structure import ModelShape, resolve_target


def _shape() -> tuple[ModelShape, ModelShape]:
    source = ModelShape.from_config(CONFIG)
    return source, resolve_target(source, TARGET)


def test_importance_log_alpha_keeps_the_top_scores_per_row():
    source, target = _shape()
    scores = {'layer': torch.tensor([0.1, 0.9]),
              'query_head': torch.tensor([[[1.0, 0.0], [3.0, 3.0]], [[5.0, 1.0], [0.0, 2.0]]]),  # [L, n_kv, group]
              'intermediate': torch.arange(2 * 64, dtype=torch.float32).reshape(2, 64).flip(-1),
              'hidden': torch.arange(32, dtype=torch.float32)}
    out = importance_log_alpha(scores, ['layer', 'head', 'query_head', 'intermediate', 'hidden', 'mlp'], target, 4.0)
    assert out['layer'].tolist() == [-4.0, 4.0]
    assert out['head'].tolist() == [[-4.0, 4.0], [4.0, -4.0]]  # groups scored by the sum of their query heads
    assert (out['query_head'] == 4.0).all()  # the target keeps whole groups (2 query heads per KV head)
    assert (out['intermediate'][:, :32] == 4.0).all() and (out['intermediate'][:, 32:] == -4.0).all()
    assert (out['hidden'][8:] == 4.0).all() and (out['hidden'][:8] == -4.0).all()
    assert out['mlp'].tolist() == [4.0, 4.0]  # whole sublayers are never removed by a target
    one_per_group = resolve_target(source, {'num_attention_heads': 2, 'num_key_value_heads': 2})
    out = importance_log_alpha(scores, ['query_head'], one_per_group, 1.0)
    assert out['query_head'].tolist() == [[[1.0, -1.0], [1.0, -1.0]], [[1.0, -1.0], [-1.0, 1.0]]]  # tie: lower index


def test_collector_scores_a_dead_unit_zero_and_ranks_it_last():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG)).train()
    source, _ = _shape()
    with torch.no_grad():  # KV group 1 of layer 0 outputs nothing; MLP channel 5 of layer 1 is never active
        model.model.layers[0].self_attn.v_proj.weight[source.head_dim:] = 0
        model.model.layers[1].mlp.up_proj.weight[5] = 0
    collector = ImportanceCollector(model, source)
    ids = torch.randint(0, CONFIG['vocab_size'], (3, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids)
    model.eval()(input_ids=ids)  # evaluation forwards do not count
    collector.sync(lambda t: t.mul_(2), 'cpu')  # as if two ranks had seen the same batch
    scores = collector.scores()
    assert collector.sums['tokens'].item() == 2 * 3 * 16 and not collector.pending
    assert scores['query_head'][0, 1].abs().max() == 0 and scores['query_head'][0, 0].min() > 0
    assert scores['intermediate'][1, 5] == 0 and scores['intermediate'][1].argmin() == 5
    assert (scores['hidden'] > 0).all() and (scores['layer'] == 0).all()  # layers: only by `measure_layer_ablation`
    collector.remove()
    model.train()(input_ids=ids)
    assert not collector.pending  # hooks removed


def _calibrated(model, ids: torch.Tensor) -> tuple[ImportanceCollector, dict[str, torch.Tensor]]:
    source, _ = _shape()
    collector = ImportanceCollector(model, source)
    model.train()(input_ids=ids)
    return collector, collector.scores() if collector.sync(lambda t: None, 'cpu') is None else None


def test_width_scores_are_the_norms_of_what_each_unit_writes_into_the_residual_stream():
    """The head score is mean_t ||W_o[:, h] z_h(t)||, the channel score mean_t |a_j(t)| ||W_down[:, j]||: a head
    with large values but zero W_o columns writes nothing and scores 0; scaling its W_o columns by c scales its score
    by c."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG))
    source, _ = _shape()
    d = source.head_dim
    ids = torch.randint(0, CONFIG['vocab_size'], (3, 16), generator=torch.Generator().manual_seed(1))
    o_proj, down_proj = model.model.layers[0].self_attn.o_proj, model.model.layers[0].mlp.down_proj
    inputs = []
    handle = o_proj.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    collector, before = _calibrated(model, ids)
    collector.remove()
    handle.remove()
    z = inputs[0].flatten(0, 1).unflatten(-1, (source.num_attention_heads, d))  # [tokens, H, D]
    direct = torch.stack([(z[:, h] @ o_proj.weight[:, h * d:(h + 1) * d].T).norm(dim=-1).mean()
                          for h in range(source.num_attention_heads)])
    torch.testing.assert_close(before['query_head'][0].flatten(), direct.detach(), rtol=1e-5, atol=0)
    with torch.no_grad():
        o_proj.weight[:, :d] = 0  # query head 0 of layer 0 writes nothing, whatever its values
        o_proj.weight[:, d:2 * d] *= 3.0
        down_proj.weight[:, 7] *= 0.5
    inputs = []
    handle = down_proj.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    collector, after = _calibrated(model, ids)
    collector.remove()
    handle.remove()
    heads_before, heads_after = before['query_head'][0].flatten(), after['query_head'][0].flatten()
    assert heads_after[0] == 0 and heads_after.argmin() == 0
    torch.testing.assert_close(heads_after[1:], heads_before[1:] * torch.tensor([3.0, 1.0, 1.0]), rtol=1e-5, atol=0)
    direct = inputs[0].flatten(0, 1).abs().mean(0) * down_proj.weight.detach().norm(dim=0)
    torch.testing.assert_close(after['intermediate'][0], direct, rtol=1e-5, atol=0)


def test_layer_score_is_the_loss_increase_when_that_layer_is_removed():
    """`measure_layer_ablation` equals the loss of the model rebuilt without the layer minus the full model's, and a
    layer that writes nothing (zero W_o and W_down) scores exactly 0."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**CONFIG, 'num_hidden_layers': 3})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    source = ModelShape.from_config(config)
    ids = torch.randint(0, CONFIG['vocab_size'], (3, 16), generator=torch.Generator().manual_seed(1))
    collector = ImportanceCollector(model, source)
    model.train()(input_ids=ids)

    def loss() -> float:
        with torch.no_grad():
            return float(model.eval()(input_ids=ids, labels=ids).loss)

    collector.measure_layer_ablation(loss)
    collector.sync(lambda t: None, 'cpu')
    collector.remove()
    scores = collector.scores()['layer']
    full = loss()
    for index in range(3):
        without = AutoModelForCausalLM.from_config(LlamaConfig(**{**CONFIG, 'num_hidden_layers': 2})).eval()
        state = {k: v for k, v in model.state_dict().items() if f'layers.{index}.' not in k}
        kept = [i for i in range(3) if i != index]
        state = {k.replace(f'layers.{old}.', f'layers.{new}.'): v for k, v in state.items()
                 for new, old in enumerate(kept) if f'layers.{old}.' in k or 'layers.' not in k}
        without.load_state_dict(state)
        with torch.no_grad():
            expected = float(without(input_ids=ids, labels=ids).loss) - full
        assert abs(scores[index].item() - expected) < 1e-5, index
    assert scores[2] == 0 and (scores[:2] != 0).all()


class _Snapshots(Callback):
    def __init__(self):
        self.masks = []
        self.trainer = None

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BATCH_END:
            self.masks.append(_mask_state(self.trainer))


def test_importance_init_freezes_masks_while_calibrating_then_starts_at_the_target(tmp_path):
    snapshots = _Snapshots()
    algorithm = _algorithm(init='importance', importance_batches=3, lagrangian_warmup='0ba', hard_finish='0ba')
    trainer, _ = _trainer(algorithm, '5ba', callbacks=[snapshots])
    snapshots.trainer = trainer
    trainer.fit()
    first = snapshots.masks[0]
    assert all((first[f'log_alpha.{n}'] == 5.0).all() for n in algorithm.masks.active)  # frozen, all on
    assert all(torch.equal(first[k], snapshots.masks[1][k]) for k in first)
    after = snapshots.masks[2]  # set at the end of the 3rd batch (algorithms run before callbacks)
    _, target = _shape()
    for name in ('layer', 'head', 'intermediate', 'hidden'):
        kept = (after[f'log_alpha.{name}'] > 0).sum(-1)
        expected = {'layer': target.num_hidden_layers, 'head': target.num_key_value_heads,
                    'intermediate': target.intermediate_size, 'hidden': target.hidden_size}[name]
        assert (kept == expected).all(), name
    assert algorithm.masks.warmup_progress.item() == 1.0  # the target sparsity is the final one at once


def test_a_run_as_long_as_its_calibration_is_one_shot_pruning(tmp_path):
    algorithm = _algorithm(init='importance', importance_batches=2, hard_finish='0ba', export_dir=str(tmp_path / 'e'))
    trainer, _ = _trainer(algorithm, '2ba')
    trainer.fit()
    assert not algorithm.calibrating  # finished at the last batch, before its checkpoint
    hidden = algorithm.masks.log_alpha['hidden'].detach()
    assert set(hidden.abs().tolist()) == {5.0} and not (hidden[:TARGET['hidden_size']] > 0).all()
    masked = trainer.state.model.model.eval()
    masked.l0_masks.hard = True  # the exact target masks
    export = AutoModelForCausalLM.from_pretrained(tmp_path / 'e', torch_dtype=torch.float32).eval()
    ids = torch.randint(0, CONFIG['vocab_size'], (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(masked(ids).logits, export(ids).logits, atol=1e-5, rtol=0)
    assert export.config.hidden_size == TARGET['hidden_size']


def test_resume_during_calibration_is_bitwise_identical(tmp_path):
    kwargs = dict(init='importance', importance_batches=4, lagrangian_warmup='0ba')
    full, full_losses = _trainer(_algorithm(**kwargs, export_dir=str(tmp_path / 'full')), '6ba')
    full.fit()
    save = dict(save_folder=str(tmp_path / 'ckpt'), save_interval='2ba', run_name='r', autoresume=True,
                save_overwrite=False)
    first, first_losses = _trainer(_algorithm(**kwargs), '6ba', **save)
    first.fit(duration='2ba')
    first.close()
    second, second_losses = _trainer(_algorithm(**kwargs, export_dir=str(tmp_path / 'resumed')), '6ba', **save)
    assert int(second.state.timestamp.batch) == 2 and second.state.algorithms[0].calibrating
    second.fit()
    resumed = first_losses.losses + second_losses.losses
    assert len(resumed) == len(full_losses.losses) == 6
    for a, b in zip(full_losses.losses, resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = load_file(tmp_path / 'full' / 'model.safetensors'), load_file(tmp_path / 'resumed' / 'model.safetensors')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hard_finish_far_above_the_target_warns_with_the_numbers(caplog):
    """Masks that cannot move (lr 0) reach the hard finish at the source size: the cut is announced, loudly."""
    algorithm = _algorithm(mask_lr=0.0, lagrangian_lr=0.0, hard_finish='2ba')
    trainer, _ = _trainer(algorithm, '4ba')
    with caplog.at_level(logging.WARNING, logger='drpruning_composer.pruning.algorithm'):
        trainer.fit()
    warnings = [r.getMessage() for r in caplog.records if 'hard finish starts at batch 2' in r.getMessage()]
    assert len(warnings) == 1 and 'above the target' in warnings[0]
    expected = f'{algorithm.target_num_params() / 1e6:.4g}M'
    assert expected in warnings[0]


def test_a_converged_run_does_not_warn(caplog):
    algorithm = _algorithm(init='importance', importance_batches=2, lagrangian_warmup='0ba', hard_finish='1ba')
    logger = InMemoryLogger()
    trainer, _ = _trainer(algorithm, '4ba', loggers=[logger])
    with caplog.at_level(logging.WARNING, logger='drpruning_composer.pruning.algorithm'):
        trainer.fit()
    assert not [r for r in caplog.records if 'hard finish starts' in r.getMessage()]
    (_, gap), = logger.data['l0/size_gap_at_hard_finish']  # checked once, at batch 3
    assert abs(gap) < 0.10


@pytest.mark.parametrize('kwargs, match', [({'init': 'random'}, 'l0_mask.init'),
                                           ({'importance_batches': 0}, 'l0_mask.importance_batches')])
def test_bad_init_options_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _algorithm(**kwargs)


@pytest.mark.parametrize('kwargs, match', [({'importance_batches': 8}, 'longer than max_duration'),
                                           ({'hard_finish': '0.5dur'}, 'before the importance calibration ends')])
def test_calibration_must_end_before_the_hard_finish(kwargs, match):
    algorithm = _algorithm(**{'init': 'importance', 'importance_batches': 4, **kwargs})
    with pytest.raises(ValueError, match=match):
        algorithm.check_calibration(Time.from_timestring('6ba'))
