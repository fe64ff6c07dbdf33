"""group_layers: which layers share a block table, for uniform and mixed attention."""

from engine.core.kv_cache_groups import KVCacheGroup, describe_kv_cache_groups, group_layers, group_size


def test_layers_that_attend_alike_form_one_group():
    assert group_layers([None] * 4) == [KVCacheGroup(None, (0, 1, 2, 3))]
    assert group_layers([4096] * 3) == [KVCacheGroup(4096, (0, 1, 2))]  # Mistral


def test_gemma_2_alternation_gives_two_equal_groups_global_first():
    windows = [4096, None] * 21
    groups = group_layers(windows)
    assert [group.sliding_window for group in groups] == [None, 4096]
    assert groups[0].layer_indices == tuple(range(1, 42, 2)) and groups[1].layer_indices == tuple(range(0, 42, 2))
    assert group_size(groups) == 21


def test_gemma_3_five_local_to_one_global_gives_six_groups_of_the_global_count():
    windows = ([1024] * 5 + [None]) * 8  # gemma-3-12b: 48 layers
    groups = group_layers(windows)
    assert [group.sliding_window for group in groups] == [None] + [1024] * 5
    assert {len(group.layer_indices) for group in groups} == {8} == {group_size(groups)}
    assert sorted(i for group in groups for i in group.layer_indices) == list(range(48))


def test_a_count_the_group_size_does_not_divide_gets_a_shorter_last_group():
    groups = group_layers([None, 7, None, 7, 7])
    assert groups == [KVCacheGroup(None, (0, 2)), KVCacheGroup(7, (1, 3)), KVCacheGroup(7, (4,))]
    assert group_size(groups) == 2


def test_the_start_up_log_names_the_groups():
    assert describe_kv_cache_groups(group_layers([None] * 4)) == ""
    assert describe_kv_cache_groups(group_layers(([1024] * 5 + [None]) * 8)) == (
        " in 6 groups of 8 layers (1 global, 5 sliding 1024)")
