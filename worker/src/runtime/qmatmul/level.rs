//! Which implementation of the kernels runs, as a value only feature
//! detection makes: every unsafe SIMD kernel relies on a [`Level`] meaning
//! "this CPU has these instructions", so safe code cannot ask for AVX-512 on a
//! CPU without it.

/// An instruction set the kernels are written for (`--kernels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Isa {
    /// Portable Rust, the reference.
    Scalar,
    /// AVX2 + FMA + F16C: `vpmaddubsw` + `vpmaddwd`.
    Avx2,
    /// AVX-512 F/BW/VL: AVX2's kernels EVEX encoded, with 32 vector
    /// registers: Skylake-SP and Cascade Lake without VNNI use it.
    Avx512,
    /// AVX-VNNI (VEX, 256-bit `vpdpbusd`: four products straight to 32
    /// bits): Alder Lake and later.
    AvxVnni,
    /// AVX-512 F/BW/VL + VNNI (EVEX 256-bit `vpdpbusd`, 32 vector registers):
    /// Ice Lake, Sapphire Rapids, Zen 4 and later. (256-bit vectors: the
    /// eight-column layout is AVX2's at every level.)
    Avx512Vnni,
}

impl Isa {
    /// The name `/ready`, the start-up log and `--kernels` use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
            Self::AvxVnni => "avx-vnni",
            Self::Avx512Vnni => "avx512-vnni",
        }
    }
}

/// A kernel level this CPU runs. Its field is private to this module and the
/// only ways to a value are the scalar level and detection, so holding one
/// proves the CPU has its instructions: what the kernels' `unsafe` blocks
/// rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Level(Isa);

impl Level {
    /// The portable kernels, which every CPU runs.
    pub const SCALAR: Self = Self(Isa::Scalar);

    /// The best level this CPU runs.
    pub fn detect() -> Self {
        Self::available().into_iter().max().unwrap_or(Self::SCALAR)
    }

    /// Every level this CPU runs (tests force each).
    pub fn available() -> Vec<Self> {
        let mut levels = vec![Self::SCALAR];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            // F16C: the attention kernels read the f16 KV cache at these levels.
            if has!("avx2") && has!("fma") && has!("f16c") {
                levels.push(Self(Isa::Avx2));
                let avx512 = has!("avx512f") && has!("avx512bw") && has!("avx512vl");
                if avx512 {
                    levels.push(Self(Isa::Avx512));
                }
                if has!("avxvnni") {
                    levels.push(Self(Isa::AvxVnni));
                }
                if avx512 && has!("avx512vnni") {
                    levels.push(Self(Isa::Avx512Vnni));
                }
            }
        }
        levels
    }

    /// `isa` if this CPU runs it (the check detection makes): how `--kernels`
    /// holds a run to a lower level than the best. The error names what the
    /// CPU runs.
    pub fn supported(isa: Isa) -> Result<Self, String> {
        let available = Self::available();
        available.iter().copied().find(|level| level.0 == isa).ok_or_else(|| {
            let names: Vec<_> = available.iter().map(|level| level.0.name()).collect();
            format!("this CPU does not run the {} kernels (it runs: {})", isa.name(), names.join(", "))
        })
    }

    pub fn isa(self) -> Isa {
        self.0
    }

    /// The name `/ready` and the start-up log report.
    pub fn name(self) -> &'static str {
        self.0.name()
    }

    /// Whether the AVX2 + FMA + F16C instructions (every level above scalar has them) run.
    pub fn has_avx2(self) -> bool {
        self.0 >= Isa::Avx2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_the_cpu_runs_is_supported() {
        let available = Level::available();
        for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::AvxVnni, Isa::Avx512Vnni] {
            match Level::supported(isa) {
                Ok(level) => assert!(available.contains(&level) && level.isa() == isa),
                Err(e) => {
                    assert!(!available.iter().any(|l| l.isa() == isa));
                    assert!(e.contains(isa.name()) && e.contains("scalar"), "{e}");
                }
            }
        }
    }

    /// A machine with the AVX2 level's features tests that level (every
    /// "at every level" test would otherwise compare scalar with scalar).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn an_avx2_machine_runs_the_avx2_level() {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("f16c") {
            assert!(Level::available().iter().any(|l| l.isa() == Isa::Avx2));
        }
    }

    #[test]
    fn detection_lists_scalar_first_and_picks_the_best() {
        let available = Level::available();
        assert_eq!(available[0], Level::SCALAR);
        assert_eq!(Level::detect(), *available.iter().max().expect("scalar at least"));
        assert!(available.windows(2).all(|pair| pair[0] < pair[1]), "{available:?}");
        assert!(available.iter().skip(1).all(|level| level.has_avx2()));
    }
}
