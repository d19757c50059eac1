//! The committed Phi-3-V references are what `scripts/oracle/phi3v_fixture.py` writes now:
//! when the Hub's remote code is present (`$LMMS_FT_PHI3V_HUB_CODE`, else
//! `../shared/hf-configs/microsoft--Phi-3-vision-128k-instruct` beside the checkout), the
//! script runs into a temporary directory and every file it writes must equal the committed
//! one byte for byte. Without the Hub code (a bare clone) there is nothing to regenerate
//! with; the test says so on stderr, and fails instead when
//! `LMMS_FT_REQUIRE_PHI3V_HUB_CODE` is set (CI machines that carry the code).

use std::path::PathBuf;

use lmms_ft_core::testing::{hf_configs, repo_root, run_oracle};

fn hub_code() -> PathBuf {
    std::env::var_os("LMMS_FT_PHI3V_HUB_CODE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            repo_root()
                .parent()
                .expect("the checkout has a parent")
                .join("shared/hf-configs/microsoft--Phi-3-vision-128k-instruct")
        })
}

#[test]
fn the_fixture_script_writes_the_committed_references() {
    let code = hub_code();
    if !code.join("modeling_phi3_v.py").is_file() {
        assert!(
            std::env::var_os("LMMS_FT_REQUIRE_PHI3V_HUB_CODE").is_none(),
            "LMMS_FT_REQUIRE_PHI3V_HUB_CODE is set but {} has no Phi-3-V Hub code",
            code.display()
        );
        eprintln!(
            "NOT REGENERATED: no Phi-3-V Hub code in {} (set LMMS_FT_PHI3V_HUB_CODE); the \
             other Phi-3-V tests still compare against the committed references",
            code.display()
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("phi3v");
    let data = hf_configs().join("microsoft--Phi-3-vision-128k-instruct");
    run_oracle(
        "phi3v_fixture.py",
        &[
            out.to_str().unwrap(),
            data.to_str().unwrap(),
            code.to_str().unwrap(),
        ],
    );
    let committed = repo_root().join("tests/data/phi3v");
    let mut compared = 0;
    for entry in std::fs::read_dir(&out).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let ours = std::fs::read(committed.join(&name))
            .unwrap_or_else(|e| panic!("{name} is written but not committed: {e}"));
        assert!(
            ours == std::fs::read(&path).unwrap(),
            "{name}: the regenerated file differs from the committed one"
        );
        compared += 1;
    }
    assert!(compared >= 8, "only {compared} files written");
    eprintln!("{compared} regenerated files equal the committed ones");
}
