"""DRPruning under FSDP (FSDP2 on CPU with gloo, 2 ranks): masks and multipliers sharded with the model, DRO weights
set collectively, and the export at fit end gathers the full model."""

import json

from conftest import REPO, TINY_TARGET, tiny_prune_overrides
from test_train import run_train


def test_fsdp2_two_ranks_prune_with_dro_exports_target_shape(tiny_demo, tmp_path):
    from transformers import AutoModelForCausalLM

    save = tmp_path / 'prune'
    args = [str(REPO / 'yamls/demo/prune.yaml'), *tiny_prune_overrides(tiny_demo, save),
            'device_train_microbatch_size=2', 'max_duration=10ba', 'save_interval=10ba',
            'algorithms.l0_mask.lagrangian_warmup=4ba', 'callbacks.dro_reweight.min_fit_points=4',
            'fsdp_config.sharding_strategy=FULL_SHARD', 'fsdp_config.mixed_precision=FULL',
            'fsdp_config.use_orig_params=true', 'fsdp_config.state_dict_type=full']
    proc = run_train(args, launcher_args=('-n', '2'), env={'FSDP_VERSION': '2'})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    config = json.loads((save / 'pruned_hf' / 'config.json').read_text())
    assert {k: config[k] for k in TINY_TARGET} == TINY_TARGET
    model, info = AutoModelForCausalLM.from_pretrained(save / 'pruned_hf', output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys']
    history = (save / 'dro' / 'history.csv').read_text().splitlines()
    assert len(history) == 1 + 5  # header + one row per evaluation
