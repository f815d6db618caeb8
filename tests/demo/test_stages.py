from moon.demo.stages import StageRunner


def test_stage_is_skipped_when_key_unchanged_and_rerun_downstream_of_a_change(tmp_path):
    calls = []

    def make(tag):
        def fn(d):
            calls.append(tag)
            (d / "out.txt").write_text(tag)
            return {"file": str(d / "out.txt")}

        return fn

    r = StageRunner(tmp_path, log=lambda m: None)
    a = r.run("a", {"n": 1}, make("a1"))
    b = r.run("b", {"m": 1}, make("b1"), after=[a])
    assert calls == ["a1", "b1"] and not a.cached
    r2 = StageRunner(tmp_path, log=lambda m: None)
    a2 = r2.run("a", {"n": 1}, make("a2"))
    b2 = r2.run("b", {"m": 1}, make("b2"), after=[a2])
    assert calls == ["a1", "b1"] and a2.cached and b2.cached and b2.outputs == b.outputs
    r3 = StageRunner(tmp_path, log=lambda m: None)
    a3 = r3.run("a", {"n": 2}, make("a3"))
    r3.run("b", {"m": 1}, make("b3"), after=[a3])
    assert calls == ["a1", "b1", "a3", "b3"]
    assert (tmp_path / "b" / "out.txt").read_text() == "b3"


def test_interrupted_stage_runs_again(tmp_path):
    r = StageRunner(tmp_path, log=lambda m: None)

    def boom(d):
        (d / "partial").write_text("x")
        raise RuntimeError("killed")

    try:
        r.run("a", {}, boom)
    except RuntimeError:
        pass
    rec = r.run("a", {}, lambda d: {"ok": True})
    assert not rec.cached and rec.outputs == {"ok": True} and not (tmp_path / "a" / "partial").exists()
