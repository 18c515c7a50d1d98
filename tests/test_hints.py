from sae_audit.hints import explain


def test_hint_for_an_unsatisfiable_slurm_request(tmp_path):
    log = tmp_path / "run.log"
    log.write_text(
        "sbatch: error: Batch job submission failed: Requested node configuration is not available\n"
    )
    quiet = tmp_path / "quiet.log"
    quiet.write_text("all good\n")
    assert len(explain([quiet, log])) == 1 and "GPU" in explain(str(log))[0]
    assert (
        explain([quiet]) == [] and explain(None) == [] and explain([tmp_path / "missing.log"]) == []
    )
