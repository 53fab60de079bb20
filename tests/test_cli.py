import argparse
import subprocess
import sys

import pytest

from street2shop.cli import build_parser, main

COMMANDS = [
    [], ["data"], ["data", "synth"], ["data", "import-street2shop"], ["data", "check"], ["train"], ["export"],
    ["serve"], ["embed"], ["beam-embed"], ["index"], ["index", "build"], ["index", "update"], ["index", "compact"], ["search"],
    ["service"], ["evaluate"], ["demo"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_every_help_works(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    assert "usage: street2shop" in capsys.readouterr().out


def test_help_is_fast_and_imports_no_tensorflow():
    code = "import sys; from street2shop.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\nprint('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False False")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "check", "/nonexistent/manifest.csv"], "manifest not found: /nonexistent/manifest.csv"),
        (["export", "/nonexistent/model.keras", "/tmp/x"], "checkpoint not found"),
        (["embed", "m.csv", "--out", "o"], "manifest not found"),
        (["train", "--batch-size", "1"], "batch_size must be >= 2. Received: batch_size=1"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_synth_and_check_through_the_cli(tmp_path, capsys):
    assert main(["data", "synth", str(tmp_path / "d"), "--products", "4", "--street-per-product", "2", "--image-size", "64", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"products": 4' in out
    (tmp_path / "d" / "images" / "street" / "p000_00.jpg").write_bytes(b"broken")
    assert main(["data", "check", str(tmp_path / "d" / "manifest.csv")]) == 0
    out = capsys.readouterr().out
    assert "1 unreadable" in out and "p000_00.jpg" in out


def test_console_script_entry_point_is_declared():
    parser = build_parser()
    assert parser.prog == "street2shop"
    import configparser
    from pathlib import Path

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    assert "street2shop = street2shop.cli:main" in cfg["options.entry_points"]["console_scripts"]


def test_embed_and_index_a_folder_of_images(tmp_path, capsys, monkeypatch):
    import numpy as np
    from PIL import Image

    from tests.test_embed import FakeEmbedder

    folder = tmp_path / "catalogue"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["b.png", "a.jpg", "sub/c.png"]):
        Image.fromarray(np.full((8, 8, 3), (40 * i, 100, 200), np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    monkeypatch.setattr("street2shop.embedders.open_embedder", lambda *args, **kwargs: FakeEmbedder())
    assert main(["embed", str(folder), "--out", str(tmp_path / "emb"), "--model", "unused", "--json"]) == 0
    assert '"embedded": 3' in capsys.readouterr().out
    assert main(["index", "build", str(tmp_path / "emb"), "--out", str(tmp_path / "index"), "--json"]) == 0
    items = [line for line in (tmp_path / "index" / "1" / "items.jsonl").read_text().splitlines() if line]
    assert [__import__("json").loads(line)["product_id"] for line in items] == ["a", "b", "c"]


def test_beam_embed_without_apache_beam_says_which_extra(monkeypatch, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def no_beam(name, *args, **kwargs):
        if name == "apache_beam" or name.startswith("apache_beam."):
            raise ModuleNotFoundError(f"No module named {name!r}", name="apache_beam")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "street2shop.beam_embed", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_beam)
    assert main(["beam-embed", "m.csv", "--out", str(tmp_path), "--model", "x"]) == 2
    assert "pip install 'street2shop[beam]'" in capsys.readouterr().err


def _options(parser, path=()):
    """(command, action) for every option of every command, nested ones too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*path, name))
        elif action.option_strings and action.help is not argparse.SUPPRESS:
            yield " ".join(path), parser, action


def test_help_says_each_default_once_and_every_option_has_help():
    checked = 0
    for command, parser, action in _options(build_parser()):
        if action.dest in ("help", "version"):
            continue
        text = parser._get_formatter()._get_help_string(action) or ""
        where = f"{command} {action.option_strings[0]}"
        assert text.strip(), f"{where} has no help"
        assert text.count("(default:") <= 1, f"{where}: {text}"
        assert "(default: None)" not in text and "(default: )" not in text, f"{where}: {text}"
        checked += 1
    assert checked > 150  # the config flags of train and demo included


def test_demo_help_explains_w_product_and_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--w-product W_PRODUCT weight of each softmax loss on product images" in out
    assert "(default: 0.5)" in out.rsplit("--w-product W_PRODUCT", 1)[1].split(" --", 1)[0]


def test_embed_with_a_split_that_selects_nothing_lists_the_splits_there_are(synth_dataset, tmp_path, capsys):
    assert main(["embed", str(synth_dataset), "--split", "catalg", "--model", "unused", "--out", str(tmp_path / "emb")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no shop photo of split(s) ['catalg']" in err and "split(s) ['catalog']" in err
    assert not (tmp_path / "emb").exists()


def test_evaluate_with_a_missing_split_lists_the_splits_there_are(synth_dataset, tmp_path, capsys):
    # Checked before the index is opened (there is none here) or any model is loaded.
    assert main(["evaluate", str(synth_dataset), "--split", "test", "--index", str(tmp_path / "no-index"), "--model", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no street photo of split 'test'" in err and "split(s) ['train', 'val']" in err


@pytest.fixture
def service_env(monkeypatch):
    """An environment without any of the service's variables, to set some in."""
    import dataclasses

    from street2shop.service.config import ServiceConfig, env_name

    for field in dataclasses.fields(ServiceConfig):
        monkeypatch.delenv(env_name(field.name), raising=False)
    return monkeypatch


def _service_config_of(argv, monkeypatch):
    """The ServiceConfig `street2shop service` would run with (the server itself is not started)."""
    seen = []
    monkeypatch.setattr("street2shop.service.serve_http", seen.append)
    assert main(["service", *argv]) == 0
    [config] = seen
    return config


def test_service_settings_come_from_the_environment_and_a_flag_wins(service_env):
    monkeypatch = service_env
    for name, value in {"STREET2SHOP_INDEX": "/srv/index", "STREET2SHOP_SERVER": "tfserving:8500", "STREET2SHOP_PORT": "9000",
                        "STREET2SHOP_MAX_UPLOAD_MB": "2.5", "STREET2SHOP_MAX_PIXELS": "1000", "STREET2SHOP_TIMEOUT": ""}.items():
        monkeypatch.setenv(name, value)
    config = _service_config_of(["--port", "8080", "--max-concurrency", "3"], monkeypatch)
    assert (config.index, config.server, config.model) == ("/srv/index", "tfserving:8500", "")
    assert config.port == 8080  # the flag, though it is the default value and the variable says 9000
    assert config.max_concurrency == 3 and config.max_upload_mb == 2.5 and config.max_pixels == 1000
    assert config.timeout == 10.0 and config.host == "127.0.0.1"  # an empty variable is unset; no variable: the default
    monkeypatch.delenv("STREET2SHOP_SERVER")
    assert _service_config_of(["--model", "/srv/exports"], monkeypatch).port == 9000


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "give the index base: --index INDEX_BASE (or STREET2SHOP_INDEX)"),
        ({"STREET2SHOP_INDEX": "/srv/index", "STREET2SHOP_SERVER": "tfs:8500"}, "give exactly one of --server HOST:PORT or --model EXPORT"),
    ],
)
def test_service_settings_that_do_not_make_a_service_are_one_line_errors(env, message, service_env, capsys):
    monkeypatch = service_env
    monkeypatch.setattr("street2shop.service.serve_http", lambda config: pytest.fail("the service started"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["service", "--model", "/srv/exports"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("name, value, message", [("STREET2SHOP_PORT", "http", "argument --port: invalid int value: 'http'"),
                                                  ("STREET2SHOP_MAX_PIXELS", "lots", "argument --max-pixels: invalid int value: 'lots'")])
def test_a_service_variable_that_is_not_a_number_names_its_flag(name, value, message, service_env, capsys):
    monkeypatch = service_env
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        main(["service", "--index", "/srv/index", "--model", "/srv/exports"])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_a_config_dataclass_field_is_a_flag_with_its_type_default_and_help():
    import dataclasses

    from street2shop.cli import add_dataclass_flags, config_of
    from street2shop.config import setting

    @dataclasses.dataclass(frozen=True)
    class Settings:
        where: str = dataclasses.field(metadata={"help": "a folder"})
        rounds: int = setting(3, "how many rounds")
        rate: float = setting(0.5, "a share")
        check: bool = setting(True, "check first")
        internal: str = "not a flag"  # no help: no flag

    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, Settings)
    args = parser.parse_args(["--where", "w", "--rounds", "7", "--no-check"])
    assert config_of(Settings, args) == Settings("w", 7, 0.5, False)
    assert config_of(Settings, parser.parse_args(["--where", "w"])) == Settings("w")
    with pytest.raises(SystemExit):
        parser.parse_args(["--rounds", "2"])  # --where is required: the field has no default
    assert "--internal" not in parser.format_help()
    given_only = argparse.ArgumentParser()
    add_dataclass_flags(given_only, Settings, defaults=Settings("x", rounds=9), only_given=True)
    assert vars(given_only.parse_args(["--where", "y", "--rate", "0.25"])) == {"where": "y", "rate": 0.25}
    assert "how many rounds (default: 9)" in " ".join(given_only.format_help().split())


def test_the_service_flags_are_the_service_configs_fields():
    import dataclasses

    from street2shop.service.config import ServiceConfig

    parser = build_parser()
    args = parser.parse_args(["service", "--index", "idx", "--server", "localhost:8500"])
    assert {f.name: getattr(args, f.name) for f in dataclasses.fields(ServiceConfig)} == dataclasses.asdict(
        ServiceConfig(index="idx", server="localhost:8500"))


def test_customer_photos_as_references_embedded_indexed_searched_and_kept_out_of_evaluation(synth_dataset, tmp_path, capsys, monkeypatch):
    """embed --domains shop,street indexes the training street photos beside the catalogue; a search that matches one of
    them says so and shows the product's catalogue photo; evaluating with indexed photos is refused."""
    import json

    from street2shop.data.records import read_manifest_csv
    from tests.test_embed import FakeEmbedder

    monkeypatch.setattr("street2shop.embedders.open_embedder", lambda *args, **kwargs: FakeEmbedder())
    records = read_manifest_csv(synth_dataset).records
    shop = {r.product_id: r.image_path for r in records if r.domain == "shop"}
    train = [r for r in records if r.domain == "street" and r.split == "train"]
    assert main(["embed", str(synth_dataset), "--domains", "shop,street", "--model", "unused", "--out", str(tmp_path / "emb")]) == 0
    assert capsys.readouterr().out.startswith(f"embedded {len(shop) + len(train)} images ({len(shop)} catalogue photos, "
                                              f"{len(train)} customer photos) (0 skipped)")
    assert main(["index", "build", str(tmp_path / "emb"), "--out", str(tmp_path / "index"), "--kind", "exact"]) == 0
    capsys.readouterr()
    # A training street photo, cropped to its box as it was indexed: its own reference is its best match (cosine 1).
    query = train[4]
    box = ",".join(f"{v:g}" for v in query.box.as_ltwh())
    search = ["search", query.image_path, "--box", box, "--index", str(tmp_path / "index"), "--model", "unused", "-k", "3"]
    assert main(search) == 0
    first = capsys.readouterr().out.splitlines()[1].split()
    assert first[:3] == ["1.", query.product_id, "1.000"]
    assert first[3:] == [shop[query.product_id], "(matched", "a", "customer", "photo:", f"{query.image_path})"]
    assert main([*search, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)[query.image_path][0]
    assert (answer["product_id"], answer["domain"], answer["image_path"]) == (query.product_id, "street", query.image_path)
    assert answer["catalogue_image"] == shop[query.product_id]
    # The indexed photos are no test of the index: refused; the held-out split is fine.
    evaluate = ["evaluate", str(synth_dataset), "--index", str(tmp_path / "index"), "--model", "unused"]
    assert main([*evaluate, "--split", "train", "--out", str(tmp_path / "r-train")]) == 2
    err = capsys.readouterr().err
    assert f"{len(train)} of the {len(train)} query photos are customer photos the index holds as references" in err
    assert main([*evaluate, "--split", "val", "--out", str(tmp_path / "r-val"), "--json"]) == 0
    report = json.loads((tmp_path / "r-val" / "report.json").read_text())["runs"]["model"]
    assert report["references"] == {"shop": len(shop), "street": len(train), "products_with_customer_photos": len(shop)}


def test_the_readme_customer_photo_commands_parse():
    """The commands of README.md's "Customer photos as references" (not run: they need the recipe's export)."""
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("**Customer photos as references.**", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["street2shop", "embed"], ["street2shop", "index"], ["street2shop", "evaluate"]]
    embed = build_parser().parse_args(commands[0][1:])
    assert (embed.domains, embed.reference_splits) == ("shop,street", "train")
    for command in commands[1:]:
        build_parser().parse_args(command[1:])
