"""`quiver train` and `quiver eval` end to end on a tiny model: exit codes, reports, and data errors."""

from quiver.trainer.cli import main
from quiver.trainer.data import write_jsonl
from tests.trainer.trainer_fixtures import WORDS, save_tiny_with_tokenizer, toy_examples


def test_train_then_eval_report_the_same_held_out_accuracy(tmp_path, capsys):
    model = save_tiny_with_tokenizer(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", toy_examples(12))
    write_jsonl(tmp_path / "heldout.jsonl", toy_examples(18)[12:])
    out = tmp_path / "adapter"
    common = ["--model", str(model), "--labels", ",".join(WORDS)]
    assert main(["train", "--method", "ptuning-v2", "--data", str(tmp_path / "train.jsonl"), "--eval-data",
                 str(tmp_path / "heldout.jsonl"), "--out", str(out), "--steps", "2", "--virtual-tokens", "3", *common]) == 0
    trained = capsys.readouterr().out.splitlines()
    assert trained[0].startswith("ptuning-v2: ") and "trainable parameters" in trained[0]
    assert trained[-1].startswith("ptuning-v2: held-out accuracy ") and trained[-1].endswith("/6)")
    assert main(["eval", "--adapter", str(out), "--data", str(tmp_path / "heldout.jsonl"), *common]) == 0
    evaluated = capsys.readouterr().out.splitlines()
    assert evaluated == [f"{out}: " + trained[-1].split(": ", 1)[1]]


def test_bad_data_exits_2_naming_file_and_line(tmp_path, capsys):
    model = save_tiny_with_tokenizer(tmp_path)
    capsys.readouterr()
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "p"}\n')
    code = main(["train", "--method", "lora", "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "a"),
                 "--model", str(model)])
    assert code == 2
    assert capsys.readouterr().err.endswith(f"error: {tmp_path / 'bad.jsonl'}:2: missing field 'completion'\n")
