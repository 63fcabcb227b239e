"""The benchmark report writer keeps everything outside its own section."""

from pathlib import Path

from fedinterest.benchmarks.report import replace_section


def test_replace_section_keeps_the_rest(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    replace_section(doc, "quality", "| a |")
    replace_section(doc, "device", "| d |")
    replace_section(doc, "quality", "| b |")
    text = doc.read_text()
    assert "intro" in text and "| d |" in text and "| b |" in text and "| a |" not in text
    assert text.index("quality:begin") < text.index("device:begin")


def test_layer_one_epsilons_measured_before_the_window_count_was_hidden_are_marked() -> None:
    from fedinterest.benchmarks.report import OLD_RELATION_MARK, WINDOW_COUNT_HIDDEN, layer1_epsilon, old_relation_note

    old = {"privacy": {"dp": True, "device_epsilon_max": 7.41, "delta": 1e-5}}
    new = {**old, WINDOW_COUNT_HIDDEN: True}
    no_dp = {"privacy": {"dp": False}}
    assert layer1_epsilon(old) == f"7.41 (1e-05) {OLD_RELATION_MARK}" and layer1_epsilon(new) == "7.41 (1e-05)"
    assert layer1_epsilon(no_dp) == "no DP"
    assert old_relation_note([new, no_dp]) == [] and "old neighbour relation" in old_relation_note([old, new])[1]
