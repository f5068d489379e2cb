"""KSM logic against temporary sysfs trees: a current kernel, an old one, and one without KSM."""

import os

import pytest
from ansible_collections.smallcloud.kvm.plugins.module_utils.host import ksm, ksm_sysfs
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import HostError, InvalidInput

pytestmark = pytest.mark.unit

# What kernel 6.18 exposes (values as a fresh boot shows them).
KERNEL_6_18 = {
    "advisor_max_cpu": "70", "advisor_max_pages_to_scan": "30000", "advisor_min_pages_to_scan": "500",
    "advisor_mode": "[none] scan-time", "advisor_target_scan_time": "200", "full_scans": "0",
    "general_profit": "0", "ksm_zero_pages": "0", "max_page_sharing": "256", "merge_across_nodes": "1",
    "pages_scanned": "0", "pages_shared": "0", "pages_sharing": "0", "pages_skipped": "0",
    "pages_to_scan": "100", "pages_unshared": "0", "pages_volatile": "0", "run": "0",
    "sleep_millisecs": "20", "smart_scan": "1", "stable_node_chains": "0",
    "stable_node_chains_prune_millisecs": "2000", "stable_node_dups": "0", "use_zero_pages": "0",
}
# What a 3.x kernel had: no use_zero_pages, max_page_sharing, smart_scan, advisor or zero-page counters.
KERNEL_3 = {name: KERNEL_6_18[name] for name in (
    "full_scans", "merge_across_nodes", "pages_shared", "pages_sharing", "pages_to_scan", "pages_unshared",
    "pages_volatile", "run", "sleep_millisecs")}


def make_tree(root, files):
    """A sysfs root whose kernel/mm/ksm holds ``files``; returns the root."""
    directory = root / "kernel" / "mm" / "ksm"
    directory.mkdir(parents=True)
    for name, value in files.items():
        (directory / name).write_text(value + "\n")
    return root


def snapshot(root):
    """Every file below ``root`` with its content, to prove nothing was written."""
    return {str(p): p.read_text() for p in root.rglob("*") if p.is_file()}


def value(root, name):
    return (root / "kernel" / "mm" / "ksm" / name).read_text().strip()


@pytest.fixture
def sysfs_root(tmp_path):
    return make_tree(tmp_path / "sys", KERNEL_6_18)


@pytest.fixture
def old_sysfs_root(tmp_path):
    return make_tree(tmp_path / "sys", KERNEL_3)


def converge(root, check=False, **options):
    params = {"sysfs_root": str(root), "persist": False}
    params.update(options)
    return ksm.converge(params, check_mode=check)


@pytest.mark.parametrize("text, parsed", [
    ("100\n", 100), ("[none] scan-time\n", "none"), ("none [scan-time]", "scan-time"), ("weird", "weird"),
])
def test_parse_sysfs_values(text, parsed):
    assert ksm_sysfs._parse(text) == parsed


def test_info_reports_counters_and_derived_figures(tmp_path):
    files = dict(KERNEL_6_18, run="1", pages_shared="100", pages_sharing="450", full_scans="7",
                 ksm_zero_pages="3")
    facts = ksm_sysfs.info(str(make_tree(tmp_path, files)))
    size = os.sysconf("SC_PAGE_SIZE")
    assert facts["running"] is True and facts["run"] == "running"
    assert facts["memory_saved_bytes"] == 450 * size
    assert facts["zero_pages_bytes"] == 3 * size
    assert facts["sharing_ratio"] == 4.5
    assert facts["full_scans"] == 7
    assert set(facts["counters"]) == set(ksm_sysfs.COUNTERS)  # every counter the kernel has
    assert facts["settings"]["advisor_mode"] == "none"
    assert "pages_sharing" not in facts["settings"]


def test_info_on_an_old_kernel_reports_what_exists(old_sysfs_root):
    facts = ksm_sysfs.info(str(old_sysfs_root))
    assert "ksm_zero_pages" not in facts["counters"] and facts["zero_pages_bytes"] == 0
    assert facts["sharing_ratio"] == 0.0 and facts["running"] is False


def test_no_ksm_directory_fails_naming_config_ksm(tmp_path):
    (tmp_path / "kernel" / "mm").mkdir(parents=True)
    with pytest.raises(HostError, match="this kernel has no KSM: CONFIG_KSM"):
        ksm_sysfs.info(str(tmp_path))
    with pytest.raises(HostError, match="this kernel has no KSM: CONFIG_KSM") as caught:
        converge(tmp_path, run="running")
    assert caught.value.details["path"] == str(tmp_path / "kernel" / "mm" / "ksm")
    assert snapshot(tmp_path) == {}


def test_check_mode_reports_changes_and_writes_nothing(sysfs_root):
    before = snapshot(sysfs_root)
    result = converge(sysfs_root, check=True, run="running", pages_to_scan=500)
    assert result["changed"] is True
    assert result["diff"]["before"] == {"run": "stopped", "pages_to_scan": 100}
    assert result["diff"]["after"] == {"run": "running", "pages_to_scan": 500}
    assert result["actions"] == ["set pages_to_scan to 500", "set run to running"]
    assert snapshot(sysfs_root) == before
    assert result["settings"]["run"] == "stopped"  # check mode reports the settings as they are


def test_apply_then_reapply_is_unchanged(sysfs_root):
    first = converge(sysfs_root, run="running", pages_to_scan=500, use_zero_pages=True, smart_scan=False)
    assert first["changed"] is True
    assert (value(sysfs_root, "run"), value(sysfs_root, "pages_to_scan")) == ("1", "500")
    assert (value(sysfs_root, "use_zero_pages"), value(sysfs_root, "smart_scan")) == ("1", "0")
    assert first["settings"]["use_zero_pages"] is True
    second = converge(sysfs_root, run="running", pages_to_scan=500, use_zero_pages=True, smart_scan=False)
    assert second["changed"] is False and second["actions"] == []


def test_unset_options_are_left_alone(sysfs_root):
    result = converge(sysfs_root)
    assert result["changed"] is False and result["diff"] == {"before": {}, "after": {}}


@pytest.mark.parametrize("preset", sorted(ksm_sysfs.PRESETS))
def test_presets_set_the_scanner_pace(sysfs_root, preset):
    converge(sysfs_root, preset=preset)
    pace = ksm_sysfs.PRESETS[preset]
    assert int(value(sysfs_root, "pages_to_scan")) == pace["pages_to_scan"]
    assert int(value(sysfs_root, "sleep_millisecs")) == pace["sleep_millisecs"]


def test_explicit_options_win_over_the_preset(sysfs_root):
    converge(sysfs_root, preset="aggressive", sleep_millisecs=50)
    assert value(sysfs_root, "sleep_millisecs") == "50"
    assert value(sysfs_root, "pages_to_scan") == str(ksm_sysfs.PRESETS["aggressive"]["pages_to_scan"])


def test_merge_across_nodes_unmerges_first_then_restores_run(tmp_path):
    root = make_tree(tmp_path, dict(KERNEL_6_18, run="1"))
    result = converge(root, merge_across_nodes=False)
    assert result["actions"] == [
        "unmerge every merged page (run=unmerge) so the kernel accepts merge_across_nodes",
        "set merge_across_nodes to 0",
        "set run to running",
    ]
    assert (value(root, "merge_across_nodes"), value(root, "run")) == ("0", "1")
    assert converge(root, merge_across_nodes=False)["changed"] is False


def test_max_page_sharing_change_ends_in_the_requested_run_state(sysfs_root):
    result = converge(sysfs_root, max_page_sharing=512, run="running")
    assert result["actions"][0].startswith("unmerge every merged page")
    assert result["actions"][-1] == "set run to running"
    assert (value(sysfs_root, "max_page_sharing"), value(sysfs_root, "run")) == ("512", "1")


def test_a_refused_write_after_unmerging_puts_run_back(tmp_path, monkeypatch):
    root = make_tree(tmp_path, dict(KERNEL_6_18, run="1"))
    real_write = ksm_sysfs.write_setting

    def kernel_refuses_max_page_sharing(directory, name, value):
        """A tmp tree cannot answer EBUSY like the kernel does; this one does for max_page_sharing."""
        if name == "max_page_sharing":
            raise HostError("writing %s to %s/%s failed: [Errno 16] Device or resource busy" % (value, directory, name))
        real_write(directory, name, value)

    monkeypatch.setattr(ksm_sysfs, "write_setting", kernel_refuses_max_page_sharing)
    with pytest.raises(HostError, match="max_page_sharing failed"):
        converge(root, max_page_sharing=512)
    assert value(root, "run") == "1"  # not left at unmerge
    assert value(root, "max_page_sharing") == "256"


def test_setting_missing_from_the_kernel_fails_naming_the_file(old_sysfs_root):
    before = snapshot(old_sysfs_root)
    with pytest.raises(HostError) as caught:
        converge(old_sysfs_root, run="running", use_zero_pages=True)
    missing = str(old_sysfs_root / "kernel" / "mm" / "ksm" / "use_zero_pages")
    assert missing in caught.value.msg and "use_zero_pages" in caught.value.msg
    assert snapshot(old_sysfs_root) == before


def test_old_kernel_still_takes_what_it_has(old_sysfs_root):
    assert converge(old_sysfs_root, run="running", preset="balanced")["changed"] is True
    assert value(old_sysfs_root, "pages_to_scan") == "1000"


@pytest.mark.parametrize("options, named", [
    ({"pages_to_scan": -1}, "pages_to_scan=-1"),
    ({"pages_to_scan": "many"}, "pages_to_scan='many'"),
    ({"sleep_millisecs": 1.5}, "sleep_millisecs=1.5"),
    ({"sleep_millisecs": True}, "sleep_millisecs=True"),
    ({"pages_to_scan": 2 ** 32}, "pages_to_scan=4294967296"),
    ({"max_page_sharing": 1}, "max_page_sharing=1"),
    ({"preset": "turbo"}, "preset='turbo'"),
    ({"run": "fast"}, "run='fast'"),
    ({"use_zero_pages": "maybe"}, "use_zero_pages='maybe'"),
])
def test_bad_input_names_the_value_and_writes_nothing(sysfs_root, options, named):
    before = snapshot(sysfs_root)
    with pytest.raises(InvalidInput) as caught:
        converge(sysfs_root, **dict({"pages_to_scan": 500}, **options))
    assert named in caught.value.msg and "allowed" in caught.value.msg
    assert caught.value.details["allowed"]
    assert snapshot(sysfs_root) == before


def test_numeric_strings_are_accepted(sysfs_root):
    converge(sysfs_root, pages_to_scan="300")
    assert value(sysfs_root, "pages_to_scan") == "300"


def test_persist_writes_a_tmpfiles_file_in_a_safe_order(sysfs_root, tmp_path):
    path = tmp_path / "etc" / "tmpfiles.d" / "smallcloud-ksm.conf"
    options = {"run": "running", "preset": "balanced", "merge_across_nodes": True, "persist": True,
               "persist_path": str(path)}
    checked = converge(sysfs_root, check=True, **options)
    assert not path.exists() and "write %s" % path in checked["actions"]
    assert checked["diff"]["before"]["persist_file"] is None
    applied = converge(sysfs_root, **options)
    assert applied["changed"] is True
    lines = [line.split() for line in path.read_text().splitlines() if not line.startswith("#")]
    directory = str(sysfs_root / "kernel" / "mm" / "ksm")
    assert [(line[0], line[1], line[-1]) for line in lines] == [
        ("w", directory + "/merge_across_nodes", "1"),
        ("w", directory + "/pages_to_scan", "1000"),
        ("w", directory + "/sleep_millisecs", "20"),
        ("w", directory + "/run", "1"),
    ]
    assert converge(sysfs_root, **options)["changed"] is False


def test_persist_rewrites_a_stale_file_even_when_sysfs_matches(sysfs_root, tmp_path):
    path = tmp_path / "ksm.conf"
    path.write_text("w /sys/kernel/mm/ksm/run - - - - 0\n")
    result = converge(sysfs_root, run="stopped", persist=True, persist_path=str(path))
    assert result["actions"] == ["write %s" % path]
    assert result["diff"]["before"]["persist_file"].startswith("w /sys")
    assert path.read_text().endswith(" 0\n") and path.read_text().startswith("# Managed")


def test_persist_false_leaves_the_file_alone(sysfs_root, tmp_path):
    path = tmp_path / "ksm.conf"
    path.write_text("operator's own\n")
    converge(sysfs_root, run="running", persist=False, persist_path=str(path))
    assert path.read_text() == "operator's own\n"
