"""The model contract: registry entries name their evaluation, models provide the protocols
that evaluation needs, and evaluating a run directory runs none of its config's code."""
import pytest
import yaml

import tests.helpers_train  # noqa: F401  (registers the toy model)
from pipeline.config import ConfigError, load_config, save_config
from pipeline.eval.__main__ import main as eval_main
from pipeline.eval.tasks import EVALUATIONS, check_contract, evaluation
from pipeline.models import BUILTIN, eval_task, model_entry
from pipeline.models.contracts import Captioner, ItmScorer, RetrievalModel, VqaAnswerer, protocol_members
from tests.helpers_train import ToyConfig, ToyModel, toy_config_dict


@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_model_provides_what_its_evaluation_calls(name):
    entry = model_entry(name)
    contract = evaluation(entry.eval_task).contract
    missing = [m for m in protocol_members(contract) if not hasattr(entry.build, m)]
    assert missing == [], f"{name} lacks {missing} of {contract.__name__}"


def test_eval_task_is_declared_on_the_registry_entry():
    assert {name: eval_task(name) for name in BUILTIN} == {
        "albef": "retrieval", "blip": "retrieval", "meter": "retrieval", "clip": "retrieval", "evlgen": "caption",
        "albef_ve": "classify", "albef_nlvr2": "classify", "meter_vqa": "vqa", "albef_vqa": "vqa", "blip_vqa": "vqa"}
    assert set(EVALUATIONS) == {"retrieval", "caption", "vqa", "classify"}
    with pytest.raises(KeyError, match="'nlvr' is not known; known: \\['caption', 'classify', 'retrieval', 'vqa'\\]"):
        evaluation("nlvr")
    assert protocol_members(VqaAnswerer) == ["answer_questions", "vqa_defaults"]
    assert all(hasattr(model_entry("evlgen").build, m) for m in protocol_members(VqaAnswerer))
    assert protocol_members(Captioner) == ["caption_defaults", "generate_captions"]
    # BLIP captions too (its decoder), though it is evaluated by retrieval
    assert all(hasattr(model_entry("blip").build, m) for m in protocol_members(Captioner))
    assert not any(hasattr(model_entry("clip").build, m) for m in protocol_members(ItmScorer))


def test_a_model_without_the_protocol_is_refused_by_name():
    model = ToyModel(ToyConfig())
    assert not isinstance(model, RetrievalModel)
    with pytest.raises(ValueError, match=r"model 'toy' \(ToyModel\) does not provide Captioner "
                                         r"\(caption_defaults, generate_captions\), which the caption evaluation"):
        check_contract(model, "caption", "toy")


@pytest.fixture
def run_with_plugin(tmp_path, monkeypatch):
    """A run directory whose config imports a module that leaves a mark when imported."""
    mark = tmp_path / "imported.txt"
    plugin = tmp_path / "plugin_dir" / "leaves_a_mark.py"
    plugin.parent.mkdir()
    plugin.write_text(f"open({str(mark)!r}, 'w').write('ran')\nimport tests.helpers_train  # noqa\n")
    monkeypatch.syspath_prepend(str(plugin.parent))
    run = tmp_path / "run"
    cfg = toy_config_dict(str(run), str(tmp_path / "shards"))
    cfg["imports"] = ["leaves_a_mark"]
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run, mark


def test_evaluating_a_run_does_not_execute_its_config_imports(run_with_plugin, capsys):
    run, mark = run_with_plugin
    # the toy model is registered (by this test module): evaluation reads the config and
    # builds the model (which then lacks retrieval), without having imported the run's module
    shards = _shard_dir(run.parent)
    assert eval_main(["retrieval", "--run", str(run), "--shards", shards]) == 2
    assert "model 'toy' (ToyModel) does not provide RetrievalModel" in capsys.readouterr().err
    assert not mark.exists()
    with pytest.raises(ConfigError, match=r"imports: \['leaves_a_mark'\] were not imported"):
        load_config(run / "config.yaml", ["model.name=only_in_the_plugin"], run_imports=False)
    load_config(run / "config.yaml")  # a config a user passes on purpose still imports its plugins
    assert mark.read_text() == "ran"


def test_eval_cli_refuses_a_model_without_the_task_protocol(tmp_path, capsys):
    run = tmp_path / "run"
    save_config(load_config(_write(tmp_path, toy_config_dict(str(run), str(tmp_path)))), run / "config.yaml")
    shards = _shard_dir(tmp_path)
    assert eval_main(["caption", "--run", str(run), "--shards", shards, "--import", "tests.helpers_train"]) == 2
    assert "does not provide Captioner" in capsys.readouterr().err
    assert eval_main(["caption", "--run", str(run), "--shards", shards, "--import", "no_such_module_x"]) == 2
    assert "--import no_such_module_x:" in capsys.readouterr().err


def _shard_dir(parent) -> str:
    """A directory that is a valid shard spec; the tests' models are refused before it is read."""
    shards = parent / "shards"
    shards.mkdir(exist_ok=True)
    (shards / "eval-000000.tar").write_bytes(b"")
    return str(shards)


def _write(tmp_path, data):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
