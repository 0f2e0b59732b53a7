"""Reading spec and merge YAML files: only safe loading, and every unreadable file is one line
naming the file and the fix (duplicate keys, not UTF-8, absurd nesting, a folder)."""

from __future__ import annotations

import pytest

from evomerge.errors import UserError
from evomerge.merge.config import load_merge_config, load_yaml_file

CASES = {
    "duplicate-top-level-key": (
        b"budget: 1\nname: x\nbudget: 2\n",
        "key 'budget' appears twice (second time at line 3)",
    ),
    "duplicate-nested-key": (b"a:\n  b: 1\n  b: 1\n", "key 'b' appears twice (second time at line 3)"),
    "latin-1": ("name: caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 9); save it as UTF-8"),
    "utf-16": ("name: x\n".encode("utf-16"), "not UTF-8 text (byte 0xff at offset 0); save it as UTF-8"),
    "nested-20000-deep": (b"a: " + b"[" * 20_000 + b"]" * 20_000, "nested too deeply to read"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_unreadable_yaml_file_is_one_line_naming_it(case, tmp_path):
    content, expected = CASES[case]
    path = tmp_path / "merge.yml"
    path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        load_merge_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_a_utf8_byte_order_mark_and_repeated_merge_keys_are_fine(tmp_path):
    path = tmp_path / "ok.yml"
    path.write_bytes("\ufeffbase: &b {x: 1}\nmore:\n  <<: *b\n  x: 2\n".encode())
    assert load_yaml_file(path) == {"base": {"x": 1}, "more": {"x": 2}}


def test_a_folder_is_named_as_such(tmp_path):
    with pytest.raises(UserError, match=r": is a folder; give the merge YAML$"):
        load_merge_config(tmp_path)
