//! `Options::device`: parsing, and a clear error (never a panic) where no GPU driver is.

use kiln::{Device, Error, Model, Options};

fn mlp() -> Model {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mlp/model.onnx");
    Model::load(p).expect("the bundled example loads")
}

#[test]
fn devices_parse_and_print() {
    assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
    assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
    assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
    assert!("cuda:x".parse::<Device>().is_err());
    assert!("tpu".parse::<Device>().is_err());
    assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
    assert_eq!(Options::default().device, Device::Cpu);
}

#[test]
fn cuda_without_a_driver_is_a_device_error() {
    let r = mlp().compile(&Options {
        device: Device::Cuda(0),
        ..Options::default()
    });
    match r {
        // A machine with a GPU and driver compiles (the program is made on the first run).
        Ok(exe) => assert_eq!(exe.device(), Device::Cuda(0)),
        Err(Error::Device { device, msg }) => {
            assert_eq!(device, Device::Cuda(0));
            assert!(msg.contains("driver") || msg.contains("device"), "{msg}");
        }
        Err(e) => panic!("expected a device error, got {e}"),
    }
}
