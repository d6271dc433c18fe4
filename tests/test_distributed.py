"""DRPruning on 2 ranks (gloo, CPU), under FSDP2 (masks and multipliers sharded with the model) and under DDP (every
parameter must get a gradient, also in the hard finish, whose masks take no part in the forward): DRO weights set
collectively, and the export at fit end gathers the full model."""

import json

import pytest

from conftest import REPO, TINY_TARGET, tiny_prune_overrides
from test_train import run_train


FSDP2 = ['fsdp_config.sharding_strategy=FULL_SHARD', 'fsdp_config.mixed_precision=FULL',
         'fsdp_config.use_orig_params=true', 'fsdp_config.state_dict_type=full']


@pytest.mark.parametrize('strategy', ['fsdp2', 'ddp'])
def test_two_ranks_prune_with_dro_and_hard_finish_export_target_shape(tiny_demo, tmp_path, strategy):
    from transformers import AutoModelForCausalLM

    save = tmp_path / 'prune'
    args = [str(REPO / 'yamls/demo/prune.yaml'), *tiny_prune_overrides(tiny_demo, save),
            'device_train_microbatch_size=2', 'max_duration=10ba', 'save_interval=10ba', 'console_log_interval=1ba',
            'algorithms.l0_mask.lagrangian_warmup=4ba', 'callbacks.dro_reweight.min_fit_points=4',
            *(FSDP2 if strategy == 'fsdp2' else [])]
    proc = run_train(args, launcher_args=('-n', '2'), env={'FSDP_VERSION': '2'} if strategy == 'fsdp2' else None)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (proc.stdout + proc.stderr).count('l0/hard_finish: 1.0000') == 2  # the default 0.2dur: batches 9 and 10

    config = json.loads((save / 'pruned_hf' / 'config.json').read_text())
    assert {k: config[k] for k in TINY_TARGET} == TINY_TARGET
    model, info = AutoModelForCausalLM.from_pretrained(save / 'pruned_hf', output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys']
    history = (save / 'dro' / 'history.csv').read_text().splitlines()
    assert len(history) == 1 + 5  # header + one row per evaluation
