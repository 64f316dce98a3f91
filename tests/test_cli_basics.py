"""The command line as a newcomer meets it: no command, --version, --help, and the default layer count."""

import json

from helpers_training import saved_model_and_data

import roma_peft
from roma_peft.cli import main


def test_no_command_is_a_usage_error_and_version_and_help_exit_0(capsys):
    assert _exit_code([]) == 2
    assert "no command given" in capsys.readouterr().err
    assert _exit_code(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"roma-peft {roma_peft.__version__}"
    assert _exit_code(["--help"]) == 0
    assert "roma-peft neighbours" in capsys.readouterr().out
    assert _exit_code(["nieghbours"]) == 2
    assert "unknown command 'nieghbours'" in capsys.readouterr().err


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def test_default_layer_count_fits_the_model_in_front_of_the_user(tmp_path, capsys):
    # a small model (the v1 smoke-test checkpoint has 4 MoE layers, this one 3): the paper's default of 5 must not be the first error a
    # newcomer sees; an explicit --num_layers that does not fit stays an error
    common = saved_model_and_data(tmp_path, num_layers=3, n=16)
    assert main(["neighbours", *common, "--output_dir", str(tmp_path / "nb"), "--k", "2"]) == 0
    captured = capsys.readouterr()
    assert "has 3 MoE layers, fewer than the default --num_layers 5: tuning all 3" in captured.err
    stored = json.loads((tmp_path / "nb" / "neighbourhood.json").read_text())["conditions"]["adapter"]
    assert stored["num_layers"] == 3 and len(stored["resolved_routers"]) == 3
    assert main(["neighbours", *common, "--output_dir", str(tmp_path / "nb5"), "--k", "2", "--num_layers", "5"]) == 2
    assert "error" in capsys.readouterr().err


def test_config_file_plus_command_line_overrides(tmp_path):
    import yaml

    from roma_peft.cli import run

    common = saved_model_and_data(tmp_path, num_layers=3, n=16)
    config = tmp_path / "neighbours.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": common[1],
                "train_file": common[3],
                "k": 2,
                "num_layers": 2,
                "output_dir": str(tmp_path / "from-file"),
            }
        )
    )
    # TRL style: --config FILE, flags override the file (here the output directory)
    summary = run(["neighbours", "--config", str(config), "--output_dir", str(tmp_path / "override")])
    assert summary["output_dir"] == str(tmp_path / "override") and not (tmp_path / "from-file").exists()
    stored = json.loads((tmp_path / "override" / "neighbourhood.json").read_text())
    assert stored["config"]["k"] == 2 and stored["conditions"]["adapter"]["num_layers"] == 2
    # a leading file works too, with overrides
    run(["neighbours", str(config), "--output_dir", str(tmp_path / "positional"), "--k", "3"])
    assert json.loads((tmp_path / "positional" / "neighbourhood.json").read_text())["config"]["k"] == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"modle_name_or_path": "x"}))
    assert _exit_code(["neighbours", "--config", str(bad)]) == 2


def test_data_in_every_file_format_and_a_json_column_map(tmp_path, capsys):
    """JSONL, a JSON array, CSV with one column per option (--column_map as JSON), parquet: the same samples."""
    import csv

    import datasets

    from roma_peft.data import load_samples

    common = saved_model_and_data(tmp_path, num_layers=3, n=12)
    samples = load_samples(common[3])
    (tmp_path / "array.json").write_text(json.dumps(samples))
    with open(tmp_path / "data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "q", "A", "B", "C", "gold"])
        for s in samples:
            writer.writerow([s["id"], s["question"], *s["options"], s["label"]])
    datasets.Dataset.from_list(samples).to_parquet(str(tmp_path / "data.parquet"))
    column_map = json.dumps({"question": "q", "options": ["A", "B", "C"], "label": "gold"})
    expected = [(s["question"], s["options"], s["label"]) for s in samples]
    for path, extra in (
        (tmp_path / "array.json", []),
        (tmp_path / "data.parquet", []),
        (tmp_path / "data.csv", ["--column_map", column_map]),
    ):
        out = tmp_path / f"eval-{path.suffix[1:]}.json"
        assert (
            main(
                [
                    "evaluate",
                    "--model_name_or_path",
                    common[1],
                    "--eval_file",
                    str(path),
                    *extra,
                    "--output_file",
                    str(out),
                ]
            )
            == 0
        ), capsys.readouterr().err
        capsys.readouterr()
        scored = json.loads(out.read_text())
        assert len(scored["ids"]) == len(samples)
    rows = load_samples(str(tmp_path / "data.csv"), column_map=json.loads(column_map))
    assert [(r["question"], [str(o) for o in r["options"]], int(r["label"])) for r in rows] == expected
    assert (
        main(
            [
                "evaluate",
                "--model_name_or_path",
                common[1],
                "--eval_file",
                str(tmp_path / "data.csv"),
                "--column_map",
                "{not json",
            ]
        )
        == 2
    )
    assert "--column_map is not valid JSON" in capsys.readouterr().err


def test_demo_takes_output_dir_like_every_other_command(capsys):
    assert _exit_code(["demo", "--help"]) == 0
    assert "--output_dir OUT, --out OUT" in capsys.readouterr().out
