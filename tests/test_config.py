import dataclasses

import pytest

from infinitehip import PRESETS, HiPConfig


def test_default_is_paper_preset():
    cfg = HiPConfig()
    assert cfg == HiPConfig.preset("paper")
    assert (cfg.sink, cfg.window, cfg.block_size_q) == (256, 1024, 64)
    assert cfg.chunk_sizes == (256, 32, 8) and cfg.stage_budgets == (None, 32768, 8192)
    assert cfg.budget == 2048 and cfg.n_selected == 256
    assert [cfg.n_kept(s) for s in range(3)] == [128, 256, 256]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_frozen(name):
    cfg = HiPConfig.preset(name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sink = 3


def test_preset_overrides_and_unknown_name():
    assert HiPConfig.preset("fast", sink=128).sink == 128
    with pytest.raises(ValueError, match="unknown preset 'nope'.*accurate"):
        HiPConfig.preset("nope")
    with pytest.raises(ValueError, match=r"unknown preset \['paper'\]"):   # was "unhashable type: 'list'"
        HiPConfig.preset(["paper"])


def test_growing_refresh_intervals_say_what_runs():
    """Stage s reruns at steps its interval divides *and* with every earlier stage: an interval
    longer than the one before it never applied (the tiny preset's intervals reversed reran the
    whole mask every 4 steps); equal ones are fine."""
    with pytest.raises(ValueError, match=r"stage 1 would rerun at least every 4 steps, not every 8; give e\.g\. "
                                         r"\(16, 8, 4\)"):
        HiPConfig.preset("tiny", refresh_intervals=(4, 8, 16))
    assert HiPConfig.preset("tiny", refresh_intervals=(16, 1, 1)).refresh_intervals == (16, 1, 1)


@pytest.mark.parametrize("changes, field", [
    (dict(sink=-1), "sink"),
    (dict(window=0), "window"),
    (dict(block_size_q=48), "block_size_q"),
    (dict(chunk_sizes=(256, 48, 8)), "chunk_sizes"),
    (dict(chunk_sizes=(256, 512, 8)), "chunk_sizes"),
    (dict(chunk_sizes=(256, 32)), "stage_budgets"),
    (dict(stage_budgets=(100, 32768, 8192)), "stage_budgets"),
    (dict(stage_budgets=(None, 1000, 8192)), "stage_budgets"),
    (dict(budget=2047), "budget"),
    (dict(budget=16384), "budget"),
    (dict(stage_strides=(3, 4, 1)), "stage_strides"),
    (dict(refresh_intervals=(2048, 16, 8)), "window"),
    (dict(head_sharing="heads"), "head_sharing"),
    (dict(rope_prune="streaming"), "rope_prune"),
    (dict(rope_attend="relative"), "rope_attend"),
    (dict(model_context_length=0), "model_context_length"),
    (dict(stage0_levels=0), "stage0_levels"),
    (dict(stage0_levels=9), "stage0_levels"),        # 256-key chunks have 8 levels
    (dict(block_size_q=32.0), "block_size_q"),        # passed as 32 once, then failed inside hip_attention
    (dict(sink=True), "sink"),
    (dict(chunk_sizes=256), "chunk_sizes"),           # a scalar for a tuple: was "'int' object is not iterable"
    (dict(refresh_intervals=8), "refresh_intervals"),
    (dict(dense_layers=0), "dense_layers"),
    (dict(dense_layers=("a",)), "dense_layers"),
    (dict(dense_layers=(1.5,)), "dense_layers"),      # was silently ignored
    (dict(refresh_intervals={16, 8, 4}), "refresh_intervals"),   # a set: iterated as (16, 8, 4), but {8, 4, 2} as (8, 2, 4)
    (dict(chunk_sizes={256: 0, 32: 0, 8: 0}), "chunk_sizes"),     # a dict: was the tuple of its keys, silently
    (dict(dense_layers=frozenset({0, 1})), "dense_layers"),
    # a stage also reruns with every earlier one: (8, 16, 32) reran every stage every 8 steps, silently
    (dict(refresh_intervals=(8, 16, 32)), "refresh_intervals"),
])
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"HiPConfig\.{field}="):
        HiPConfig(**changes)


def test_refresh_schedule():
    cfg = HiPConfig()  # intervals 32, 16, 8
    stages = [cfg.refresh_stage(t) for t in range(65)]
    assert stages[0] == 0 and stages[32] == 0 and stages[64] == 0
    assert stages[16] == 1 and stages[48] == 1
    assert stages[8] == 2 and stages[24] == 2
    assert stages[1] == stages[7] == 3
    assert sum(s < 3 for s in stages[1:65]) == 8  # seven steps in eight prune nothing


def test_dense_layers_get_larger_budget():
    cfg = HiPConfig()
    assert cfg.for_layer(0, 32).budget == 4096
    assert cfg.for_layer(31, 32).budget == 4096
    assert cfg.for_layer(10, 32).budget == 2048
    # An index past the model names no layer (it wrapped around to layer 0 before).
    assert all(HiPConfig(dense_layers=(100,)).for_layer(i, 4).budget == 2048 for i in range(4))
    assert [HiPConfig().for_layer(i, 2).budget for i in range(2)] == [4096, 4096]
    for layer, n in ((0, 0), (4, 4), (-1, 4)):   # a ZeroDivisionError, or a layer the model lacks
        with pytest.raises(ValueError, match=f"layer {layer} of a {n}-layer model"):
            HiPConfig().for_layer(layer, n)


def test_probe_levels():
    """log2 of each stage's chunk; stage0_levels caps stage 0 only."""
    assert [HiPConfig().probe_levels(s) for s in range(3)] == [8, 5, 3]
    assert [HiPConfig(stage0_levels=3).probe_levels(s) for s in range(3)] == [3, 5, 3]


def test_parse_overrides_reads_literals_and_names_bad_fields():
    from infinitehip.config import parse_overrides

    got = parse_overrides(["stage0_levels=3", "chunk_sizes=(256, 32, 8)", "model_context_length=None",
                           "rope_prune=exact", "dense_layers = (0, 1)"])
    assert got == dict(stage0_levels=3, chunk_sizes=(256, 32, 8), model_context_length=None, rope_prune="exact",
                       dense_layers=(0, 1))
    assert HiPConfig().replace(**got).stage0_levels == 3
    with pytest.raises(ValueError, match=r"no field 'budgt'.*budget"):
        parse_overrides(["budgt=4096"])
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_overrides(["budget"])
    # the last of two silently won
    with pytest.raises(ValueError, match=r"--hip budget is given twice \(budget=4096 and 'budget=2048'\)"):
        parse_overrides(["budget=4096", "budget=2048"])


@pytest.mark.parametrize("item, message", [
    ("dense_layers={0: 1}", r"HiPConfig\.dense_layers=\{0: 1\} is invalid: must be a tuple or list \(a dict gives only "
                            r"its keys; the paper's: \(0, 1, 2, 3, -1\)\)"),   # became (0,), silently
    ("refresh_intervals={8, 4}", r"HiPConfig\.refresh_intervals=.* is invalid: must be a tuple or list \(a set has no "
                                 r"order, and entries go by stage"),
    ("budget={4096}", r"HiPConfig\.budget=\{4096\} is invalid: must be an integer >= 1"),
    ("rope_prune={'exact': 1}", r"HiPConfig\.rope_prune=\{'exact': 1\} is invalid: must be one of"),
])
def test_overrides_of_the_wrong_type_are_refused_by_the_config(item, message):
    """--hip parses values; whether a dict or set fits a field is HiPConfig's check alone (the
    parser had a copy of it for dicts and sets), one message whichever way the config is made."""
    from infinitehip.config import parse_overrides

    overrides = parse_overrides([item])
    with pytest.raises(ValueError, match=message):
        HiPConfig().replace(**overrides)


def test_unordered_stage_tuple_is_refused():
    """A set's order is its hash table's: refresh_intervals={8, 4, 2} silently became (8, 2, 4),
    stage 1 refreshing every 2 steps and stage 2 every 4."""
    with pytest.raises(ValueError, match=r"HiPConfig\.refresh_intervals=.*has no order"):
        HiPConfig.preset("tiny", refresh_intervals={8, 4, 2})
    assert HiPConfig.preset("tiny", refresh_intervals=[8, 4, 2]).refresh_intervals == (8, 4, 2)   # a list is fine


def test_budgets_wider_than_a_mask_row_are_refused():
    """Masks are as wide as the budgets whatever the context: a budget of 2**30 made 2**27-entry
    rows (gigabytes on a short context, and past the Triton attention kernel's 2**20-element
    block, a compile error deep inside). Refused by field, with the most it may be."""
    from infinitehip.config import MAX_MASK_ROW

    huge = 1 << 30
    with pytest.raises(ValueError, match=r"HiPConfig\.stage_budgets=\(None, 1073741824, 1073741824\) is invalid: "
                                         r"entry 1: 1,073,741,824 tokens .* give at most 33,554,432"):
        HiPConfig.preset("paper", stage_budgets=(None, huge, huge), budget=huge, dense_layer_budget=huge)
    one_stage = dict(chunk_sizes=(8,), stage_budgets=(None,), stage_strides=(1,), refresh_intervals=(8,))
    with pytest.raises(ValueError, match=r"HiPConfig\.budget=1073741824 is invalid: .* give at most 8,388,608"):
        HiPConfig.preset("paper", **one_stage, budget=huge)
    with pytest.raises(ValueError, match=r"HiPConfig\.dense_layer_budget=1073741824 is invalid: .* at most 8,388,608"):
        HiPConfig.preset("paper", **one_stage, dense_layer_budget=huge)
    top = MAX_MASK_ROW * 8   # the widest rows are fine
    cfg = HiPConfig.preset("paper", stage_budgets=(None, MAX_MASK_ROW * 32, top), budget=top, dense_layer_budget=top)
    assert cfg.n_selected == MAX_MASK_ROW
