//! Calibration inputs for approximate rewrites (`--approx`, Python's `approx=`): sets loaded
//! from a folder in ONNX test layout, or handed in from memory, each checked against the
//! model's declared inputs before the budget machinery runs them.

use crate::{check_inputs, Error, Model};
use kiln_ir::Tensor;
use kiln_passes::approx::Calibration;
use kiln_reference::TestData;
use std::path::{Path, PathBuf};

/// The `test_data_set_*` folders under `dir`, or `dir` itself when it holds `input_*.pb`.
fn set_dirs(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let bad = |msg: String| Error::Calibration {
        origin: dir.display().to_string(),
        msg,
    };
    if !dir.is_dir() {
        return Err(bad("not a folder".into()));
    }
    let is_input = |n: &str| n.starts_with("input_") && n.ends_with(".pb");
    let names = |d: &Path| -> Result<Vec<(String, PathBuf)>, Error> {
        let rd = std::fs::read_dir(d).map_err(|e| bad(format!("reading it: {e}")))?;
        Ok(rd
            .filter_map(|e| e.ok())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect())
    };
    let entries = names(dir)?;
    if entries.iter().any(|(n, _)| is_input(n)) {
        return Ok(vec![dir.to_path_buf()]);
    }
    let mut sets: Vec<PathBuf> = entries
        .into_iter()
        .filter(|(n, p)| n.starts_with("test_data_set_") && p.is_dir())
        .map(|(_, p)| p)
        .collect();
    sets.sort();
    if sets.is_empty() {
        return Err(bad(
            "no test_data_set_* folders (ONNX test layout: test_data_set_N/input_K.pb) and no input_*.pb"
                .into(),
        ));
    }
    Ok(sets)
}

impl Model {
    /// Calibration sets from `dir`: a folder of `test_data_set_*` folders, or one such
    /// folder. The last third of the sets (at least one of two or more) is held out.
    pub fn calibration_from_dir(&self, dir: &Path) -> Result<Calibration, Error> {
        let mut sets = Vec::new();
        for d in set_dirs(dir)? {
            let data = TestData::load(&d).map_err(|e| Error::Calibration {
                origin: d.display().to_string(),
                msg: e.to_string(),
            })?;
            sets.push(data.inputs.into_iter().map(|(_, t)| t).collect());
        }
        self.calibration_from_sets(sets, &dir.display().to_string())
    }

    /// Calibration sets from memory, each in the model's input order; `source` names them
    /// in the report. Every set is checked against the model's inputs.
    pub fn calibration_from_sets(
        &self,
        sets: Vec<Vec<Tensor>>,
        source: &str,
    ) -> Result<Calibration, Error> {
        if sets.is_empty() {
            return Err(Error::Calibration {
                origin: source.into(),
                msg: "no calibration sets".into(),
            });
        }
        let ios = self.inputs();
        for (k, set) in sets.iter().enumerate() {
            if set.len() != ios.len() {
                return Err(Error::Calibration {
                    origin: source.into(),
                    msg: format!(
                        "set {k} has {} inputs but the model takes {} ({})",
                        set.len(),
                        ios.len(),
                        crate::describe_inputs(&ios)
                    ),
                });
            }
            check_inputs(&ios, set).map_err(|e| Error::Calibration {
                origin: source.into(),
                msg: format!("set {k}: {e}"),
            })?;
        }
        Ok(Calibration::split(sets, source, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mlp() -> Model {
        Model::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/mlp/model.onnx"
        ))
        .unwrap()
    }

    #[test]
    fn sets_that_do_not_fit_the_inputs_are_errors_naming_the_set() {
        let m = mlp();
        let e = m.calibration_from_sets(vec![vec![]], "mem").unwrap_err();
        assert!(e.to_string().contains("set 0 has 0 inputs"), "{e}");
        let wrong = Tensor::from_vec(vec![2, 3], vec![0f32; 6]);
        let e = m
            .calibration_from_sets(vec![vec![wrong]], "mem")
            .unwrap_err();
        assert!(e.to_string().contains("set 0: input `x`"), "{e}");
        let e = m.calibration_from_sets(vec![], "mem").unwrap_err();
        assert!(e.to_string().contains("no calibration sets"), "{e}");
    }

    #[test]
    fn a_test_data_folder_loads_and_holds_out_the_last_third() {
        let m = mlp();
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/mlp"));
        let c = m.calibration_from_dir(dir).unwrap();
        assert_eq!(c.calibrate.len() + c.held_out.len(), 1);
        let e = m.calibration_from_dir(&dir.join("model.onnx")).unwrap_err();
        assert!(e.to_string().contains("not a folder"), "{e}");
    }
}
