//! Where the forward pass runs (`--device`): the CPU, or a CUDA GPU in builds
//! with the `cuda` feature.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// The `--device` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The first GPU the process can see (CUDA builds), else the CPU.
    #[default]
    Auto,
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => text
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("{text:?} is not a device: expected auto, cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// Opens the device: `auto` falls back to the CPU when this build has no
    /// CUDA or no GPU is visible; an explicit `cuda` that cannot open is an
    /// error.
    pub fn open(self) -> Result<Device, String> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => cuda(n),
            Self::Auto => Ok(cuda(0).unwrap_or(Device::Cpu)),
        }
    }
}

fn cuda(ordinal: usize) -> Result<Device, String> {
    if !candle_core::utils::cuda_is_available() {
        return Err("this kandle-worker was built without CUDA (cargo feature `cuda`)".into());
    }
    Device::new_cuda(ordinal).map_err(|e| format!("cannot open cuda:{ordinal}: {e}"))
}

/// How `/ready` and the logs name a device.
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Free memory of a GPU, in bytes (`None` on the CPU).
pub fn free_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(gpu) = device {
        return gpu.cuda_stream().context().mem_get_info().ok().map(|(free, _)| free as u64);
    }
    let _ = device;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choices_parse_and_print() {
        for (text, choice) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceChoice>(), Ok(choice));
        }
        assert_eq!(DeviceChoice::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", ""] {
            let error = bad.parse::<DeviceChoice>().expect_err(bad);
            assert!(error.contains("expected auto, cpu, cuda or cuda:N"), "{error}");
        }
    }

    /// Without a GPU (this machine, and every build without the feature),
    /// `auto` is the CPU and an explicit GPU is a clear error.
    #[test]
    fn auto_falls_back_to_the_cpu() {
        assert!(DeviceChoice::Cpu.open().is_ok_and(|d| d.is_cpu()));
        let gpu = DeviceChoice::Cuda(0).open();
        match DeviceChoice::Auto.open() {
            Ok(device) if device.is_cpu() => {
                let error = gpu.expect_err("no GPU");
                assert!(error.contains("built without CUDA") || error.contains("cannot open cuda:0"), "{error}");
            }
            Ok(device) => assert_eq!(name(&device), "cuda:0"),
            Err(e) => panic!("auto never fails: {e}"),
        }
        assert_eq!(name(&Device::Cpu), "cpu");
        assert_eq!(free_memory(&Device::Cpu), None);
    }
}
