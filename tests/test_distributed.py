"""DRPruning on 2 ranks (gloo, CPU), under FSDP2 (masks and multipliers sharded with the model) and under DDP (every
parameter must get a gradient, also in the hard finish, whose masks take no part in the forward), with distillation
from the source (the teacher sharded over the ranks under FSDP2, replicated under DDP) and DRO against the teacher's
losses: DRO weights set collectively, the teacher reference the same on every rank, and the export at fit end
gathers the full model."""

import json

import pytest

from conftest import DOMAINS, REPO, TINY_TARGET, tiny_prune_overrides
from drpruning_composer.dro.report import read_history_csv
from test_train import run_train


FSDP2 = ['fsdp_config.sharding_strategy=FULL_SHARD', 'fsdp_config.mixed_precision=FULL',
         'fsdp_config.use_orig_params=true', 'fsdp_config.state_dict_type=full']


@pytest.fixture(scope='module')
def source(tiny_demo, tmp_path_factory):
    """A saved random-init source model (the teacher)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp('source')
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_demo / 'tiny_llama')).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_demo / 'tiny_llama').save_pretrained(folder)
    return folder


@pytest.mark.parametrize('strategy', ['fsdp2', 'ddp'])
def test_two_ranks_prune_with_dro_distillation_and_hard_finish_export_target_shape(tiny_demo, source, tmp_path,
                                                                                   strategy):
    from transformers import AutoModelForCausalLM

    save = tmp_path / 'prune'
    args = [str(REPO / 'yamls/demo/prune.yaml'), *tiny_prune_overrides(tiny_demo, save),
            'device_train_microbatch_size=2', 'max_duration=10ba', 'save_interval=10ba', 'console_log_interval=1ba',
            'algorithms.l0_mask.lagrangian_warmup=4ba', 'callbacks.dro_reweight.min_fit_points=4',
            f'variables.source_model={source}', 'model.pretrained=true', 'algorithms.distill.alpha=0.5',
            'callbacks.dro_reweight.reference_loss=teacher', 'eval_first=true',
            *(FSDP2 + ['algorithms.distill.teacher_sharding=fsdp'] if strategy == 'fsdp2' else [])]
    proc = run_train(args, launcher_args=('-n', '2'), env={'FSDP_VERSION': '2'} if strategy == 'fsdp2' else None)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (proc.stdout + proc.stderr).count('l0/hard_finish: 1.0000') == 2  # the default 0.2dur: batches 9 and 10

    config = json.loads((save / 'pruned_hf' / 'config.json').read_text())
    assert {k: config[k] for k in TINY_TARGET} == TINY_TARGET
    model, info = AutoModelForCausalLM.from_pretrained(save / 'pruned_hf', output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys']
    _, rows = read_history_csv(str(save / 'dro' / 'history.csv'))
    assert [r['batch'] for r in rows] == [0, 2, 4, 6, 8, 10]  # one row per evaluation
    # The teacher's losses, summed over both ranks' eval batches, are the synced metric of the student at batch 0
    # (still the source): a rank-local measurement would differ.
    reference = [rows[0][f'ref_loss/{d}'] for d in DOMAINS]
    assert [rows[0][f'loss/{d}'] for d in DOMAINS] == pytest.approx(reference, rel=1e-5)
    assert all([r[f'ref_loss/{d}'] for d in DOMAINS] == reference for r in rows)
