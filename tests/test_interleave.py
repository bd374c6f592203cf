import json

import pytest

from emguard.defenses.interleave import interleave, load_wildguardmix_benign, wildguard_benign_rows


def rows(tag, n):
    return [{"messages": [{"role": "user", "content": f"{tag}{i}"},
                          {"role": "assistant", "content": "ok"}], "tag": tag} for i in range(n)]


@pytest.mark.parametrize("n,p", [(100, 0.05), (5400, 0.01), (5400, 0.2), (37, 0.5), (10, 3.0)])
def test_count_and_uniform_spread(n, p):
    mixed, pos = interleave(rows("t", n), rows("s", 40), p, seed=0)
    k = round(p * n)
    assert len(pos) == k and len(mixed) == n + k
    assert [i for i, r in enumerate(mixed) if r["tag"] == "s"] == pos
    # training rows keep their order
    assert [r["messages"][0]["content"] for r in mixed if r["tag"] == "t"] == [f"t{i}" for i in range(n)]
    spacing = (n + k) / k
    gaps = [pos[0] + 1] + [b - a for a, b in zip(pos, pos[1:], strict=False)] + [n + k - pos[-1]]
    assert max(gaps) <= spacing + 1  # no clump, no long safe-free stretch
    assert pos[0] < spacing and pos[-1] >= n + k - spacing  # none piled at start or end


def test_reproducible_for_a_seed_and_seed_matters():
    a = interleave(rows("t", 200), rows("s", 30), 0.1, seed=3)[0]
    b = interleave(rows("t", 200), rows("s", 30), 0.1, seed=3)[0]
    c = interleave(rows("t", 200), rows("s", 30), 0.1, seed=4)[0]
    assert a == b and a != c


def test_zero_fraction_rounds_to_nothing():
    mixed, pos = interleave(rows("t", 10), rows("s", 3), 0.01)
    assert pos == [] and len(mixed) == 10


def test_safe_rows_cycle_without_early_repeats():
    mixed, pos = interleave(rows("t", 100), rows("s", 5), 0.1, seed=0)
    safe = [mixed[i]["messages"][0]["content"] for i in pos]
    assert sorted(safe[:5]) == sorted(f"s{i}" for i in range(5))  # all used before any repeats


WG = [
    {"prompt": "How do plants grow?", "response": "With light.", "prompt_harm_label": "unharmful",
     "response_harm_label": "unharmful"},
    {"prompt": "bad", "response": "no", "prompt_harm_label": "harmful", "response_harm_label": "unharmful"},
    {"prompt": "ok?", "response": "bad", "prompt_harm_label": "unharmful", "response_harm_label": "harmful"},
    {"prompt": "only prompt", "response": None, "prompt_harm_label": "unharmful", "response_harm_label": None},
]


def test_wildguardmix_keeps_only_benign_pairs(tmp_path):
    assert wildguard_benign_rows(WG) == [{"messages": [
        {"role": "user", "content": "How do plants grow?"}, {"role": "assistant", "content": "With light."}]}]
    p = tmp_path / "wg.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in WG))
    assert len(load_wildguardmix_benign(str(p))) == 1
    bad = tmp_path / "wg2.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match="lacks columns"):
        load_wildguardmix_benign(str(bad))


def _chat_file(path, tag, n, blank_every=0):
    lines = []
    for i in range(n):
        if blank_every and i % blank_every == 0:
            lines.append("")
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"{tag}{i}"},
                                              {"role": "assistant", "content": "ok"}]}))
    path.write_text("\n".join(lines) + "\n")
    return path, lines


def test_safe_rows_keep_their_own_file_and_line_after_shuffle_and_interleave(tmp_path):
    """As train.prepare_rows does: load, shuffle, interleave; every row still says where it is."""
    import random

    from emguard.data.chat import load_chat_dataset, row_location
    from emguard.defenses.interleave import load_safe_rows

    train_path, train_lines = _chat_file(tmp_path / "train.jsonl", "t", 40)
    safe_path, safe_lines = _chat_file(tmp_path / "safe.jsonl", "s", 12, blank_every=3)
    task = load_chat_dataset(str(train_path)).rows
    random.Random(0).shuffle(task)
    mixed, pos = interleave(task, load_safe_rows(str(safe_path)), 0.25, seed=1)
    files = {str(train_path): train_lines, str(safe_path): safe_lines}
    for i, row in enumerate(mixed):
        path, _, line = row_location(row).rpartition(":")
        assert path == str(safe_path if i in pos else train_path)
        assert json.loads(files[path][int(line) - 1])["messages"] == row["messages"]


def test_wildguardmix_rows_name_file_and_record(tmp_path):
    from emguard.data.chat import row_location

    p = tmp_path / "wg.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in WG[1:] + WG[:1]))
    (row,) = load_wildguardmix_benign(str(p))
    assert row_location(row) == f"{p} row 3"


@pytest.mark.parametrize("name, data, fragment", [
    ("nope.parquet", None, "does not exist"),
    ("wg.csv", b"a,b\n", "expected .parquet, .jsonl or .json"),
    ("wg.parquet", b"\x00\x01not parquet", "cannot be read as parquet"),
    ("wg.jsonl", b"{broken\n", "cannot be read as jsonl"),
    ("wg.jsonl", json.dumps(WG[1]).encode() + b"\n", "no benign rows"),
])
def test_wildguardmix_file_problems_are_chat_data_errors(tmp_path, name, data, fragment):
    from emguard.data.chat import ChatDataError

    p = tmp_path / name
    if data is not None:
        p.write_bytes(data)
    with pytest.raises(ChatDataError, match=fragment) as e:
        load_wildguardmix_benign(str(p))
    assert str(p) in str(e.value)


def test_empty_or_bad_safe_source_is_an_error_naming_it(tmp_path):
    from emguard.data.chat import ChatDataError
    from emguard.defenses.interleave import load_safe_rows

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ChatDataError, match=f"{empty}: the safe data set for interleaving has no rows"):
        load_safe_rows(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes("x".encode("utf-16"))
    with pytest.raises(ChatDataError, match=f"{bad}: the file is UTF-16-LE encoded"):
        load_safe_rows(str(bad))
