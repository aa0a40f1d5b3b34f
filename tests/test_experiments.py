"""The experiment grids: the commands each cell runs, and resuming (a cell with a record is never run again)."""

import json
import os

import pytest

from experiments import label_efficiency


def flag(cmd: list[str], name: str) -> str | None:
    values = [arg.split('=', 1)[1] for arg in cmd if arg.startswith(f'--config.{name}=')]
    return values[-1] if values else None


def test_cell_commands_differ_only_where_the_methods_do():
    runs = os.path.join('runs', 'x')
    cmds = {
        m: label_efficiency.cell_command('hapt', m, 0.05, 2, runs)
        for m in ('baseline', 'refnet', 'pretrain', 'refnet_input')
    }
    for method, cmd in cmds.items():
        assert cmd[:2] == ['python', 'train.py']
        assert flag(cmd, 'seed') == '2'
        assert flag(cmd, 'data.label_fraction') == '0.05'
        assert flag(cmd, 'train.num_steps') == str(label_efficiency.STEPS['hapt'])
        assert cmd[cmd.index('--workdir') + 1] == os.path.join(runs, 'hapt', f'{method}-f0.05-seed2')
    assert cmds['baseline'][3] == 'configs/hapt.py:variant=baseline'
    assert all(cmds[m][3] == 'configs/hapt.py:variant=refnet' for m in ('refnet', 'pretrain', 'refnet_input'))
    # The pre-trained cell starts from the pre-training run of its own seed, and keeps its `input` targets;
    # the control has the same targets and no start.
    pretrain_cmd = label_efficiency.pretrain_command('hapt', 2, runs)
    assert flag(cmds['pretrain'], 'init_from') == pretrain_cmd[pretrain_cmd.index('--workdir') + 1]
    assert flag(cmds['pretrain'], 'model.refiner.target') == 'input'
    assert flag(cmds['refnet_input'], 'model.refiner.target') == 'input'
    assert flag(cmds['refnet_input'], 'init_from') is None
    assert flag(cmds['refnet'], 'model.refiner.target') is None
    assert flag(pretrain_cmd, 'seed') == '2' and pretrain_cmd[1] == 'pretrain.py'


def test_parse_cell_round_trips_record_names_and_names_the_bad_field():
    assert label_efficiency.parse_cell('hapt/pretrain-f0.01-seed0') == ('hapt', 'pretrain', 0.01, 0)
    assert label_efficiency.parse_cell('easy_vqa/refnet_input-f1.0-seed2') == (
        'easy_vqa',
        'refnet_input',
        1.0,
        2,
    )
    with pytest.raises(ValueError, match='expected <dataset>'):
        label_efficiency.parse_cell('hapt/pretrain-seed0')
    with pytest.raises(ValueError, match="dataset 'mnist'"):
        label_efficiency.parse_cell('mnist/baseline-f0.01-seed0')
    with pytest.raises(ValueError, match="method 'finetune'"):
        label_efficiency.parse_cell('hapt/finetune-f0.01-seed0')
    with pytest.raises(ValueError, match='fraction 0.5'):
        label_efficiency.parse_cell('hapt/baseline-f0.5-seed0')


def test_grid_runs_only_the_missing_cells(tmp_path, monkeypatch):
    monkeypatch.setattr(label_efficiency, 'OUT', str(tmp_path))
    ran = []

    def fake_run_cell(cmd, workdir, record_path, *, root):
        ran.append(os.path.relpath(record_path, tmp_path))
        record = {'results': {'test': {'accuracy': 0.5, 'fused_spread': 0.1}}, 'wall_seconds': 1.0}
        os.makedirs(os.path.dirname(record_path), exist_ok=True)
        with open(record_path, 'w') as f:
            json.dump(record, f)
        return record

    monkeypatch.setattr(label_efficiency.report_lib, 'run_and_record', fake_run_cell)
    # Finished before the interruption: the pre-training and one cell of seed 0.
    for name in ('pretrain-seed0', 'refnet-f0.01-seed0'):
        fake_run_cell(None, None, label_efficiency.record_path('hapt', name), root=None)
    ran.clear()

    label_efficiency.run_missing(
        ['hapt'], [0], 'runs', methods=('baseline', 'refnet', 'pretrain'), fractions=(0.01, 0.1)
    )
    assert ran == [
        os.path.join('hapt', f'{name}.json')
        for name in (
            'baseline-f0.01-seed0',
            'pretrain-f0.01-seed0',
            'baseline-f0.1-seed0',
            'refnet-f0.1-seed0',
            'pretrain-f0.1-seed0',
        )
    ]
    ran.clear()
    label_efficiency.run_missing(
        ['hapt'], [0], 'runs', methods=('baseline', 'refnet', 'pretrain'), fractions=(0.01, 0.1)
    )
    assert ran == []  # everything is recorded: nothing runs again
    # A grid without the pre-trained method does not pre-train.
    label_efficiency.run_missing(['hapt'], [1], 'runs', methods=('refnet_input',), fractions=(0.01,))
    assert ran == [os.path.join('hapt', 'refnet_input-f0.01-seed1.json')]


def test_table_rows_build_train_commands_that_configs_accept():
    """Every row of every result table names a config argument its config file takes, and its extra flags
    follow the seed and the pinned decay mask (the bfloat16 row)."""
    from experiments import tables
    from refnet_jax import config_lib

    for dataset, rows in tables.TABLES.items():
        for row, spec in rows.items():
            config_lib.load_file(
                os.path.join(tables.ROOT, 'configs', f'{dataset}.py:{spec.arg}')
            )  # argument ok
            cmd = tables.cell_command(dataset, row, 0, 'runs/x')
            if spec.flags:
                assert cmd[-len(spec.flags) :] == list(spec.flags)
            assert '--config.seed=0' in cmd and tables.PINNED[0] in cmd
    assert tables.TABLES['easy_vqa']['lowrank-refnet-bf16'].flags == ('--config.model.dtype=bfloat16',)
    later = {f'{k}-{v}' for k in tables.LATER_FUSIONS for v in ('baseline', 'refiner', 'refnet')}
    assert later <= set(tables.TABLES['easy_vqa']) and later <= set(tables.TABLES['hapt'])


def test_rows_are_chosen_by_name_or_pattern_over_several_datasets():
    from experiments import tables

    selected = tables.select_rows(['easy_vqa', 'hapt'], ['deq-*', 'progressive-*', 'coupled_mamba-*'])
    later = [f'{k}-{v}' for k in tables.LATER_FUSIONS for v in ('baseline', 'refiner', 'refnet')]
    assert selected == {'easy_vqa': later, 'hapt': later}  # table order
    assert tables.select_rows(['hapt'], ['acc-only', 'fused-refnet']) == {
        'hapt': ['acc-only', 'fused-refnet']
    }
    assert tables.select_rows(['uci_mfeat'], [])['uci_mfeat'] == list(tables.TABLES['uci_mfeat'])
    # A pattern must match a row of one of the datasets, at least: 'acc-only' is HAPT's alone.
    assert tables.select_rows(['easy_vqa', 'hapt'], ['acc-only']) == {'easy_vqa': [], 'hapt': ['acc-only']}
    with pytest.raises(ValueError, match=r"--rows \['mmft-baselin'\] match no row"):
        tables.select_rows(['easy_vqa', 'hapt'], ['mmft-baselin', 'mmft-*'])


def test_a_row_runs_only_for_its_own_seeds(tmp_path, monkeypatch):
    """The grid asks for seeds 0-2; the one-seed check row runs for seed 2 alone, the others for all three."""
    from experiments import tables

    ran = []

    def fake_run_cell(cmd, workdir, record_path, *, root):
        ran.append(os.path.basename(record_path))
        return {'results': {'test': {'accuracy': 0.5}}, 'wall_seconds': 1.0}

    monkeypatch.setattr(tables, 'cell_path', lambda d, r, s: str(tmp_path / f'{r}-seed{s}.json'))
    monkeypatch.setattr(tables.report_lib, 'run_and_record', fake_run_cell)
    tables.run_missing(
        'easy_vqa', ['coupled_mamba_4000steps-refnet', 'deq-baseline'], list(tables.SEEDS), 'runs'
    )
    assert ran == [
        'coupled_mamba_4000steps-refnet-seed2.json',
        *(f'deq-baseline-seed{s}.json' for s in tables.SEEDS),
    ]
