//! A fresh identity for a VM restored from a snapshot: everything a
//! [`Resume`] carries is applied before anything of the job runs, so no two
//! jobs restored from one snapshot share random state, time or name (see
//! "Snapshots" in docs/architecture.md for what stays the same).
//!
//! Order: the generation is checked and taken first (a `Resume` is applied
//! once per VM, never twice, even half-way), then the host's entropy is
//! credited to the kernel's pool (`RNDADDENTROPY`) and the CRNG reseeded
//! from it (`RNDRESEEDCRNG`), then the clock is stepped, then the host
//! name set.

use std::io;
use std::os::fd::AsRawFd;

use kiln_agent::proto::Resume;

use super::error::{Error, Result};

/// `_IOW('R', 0x03, int[2])`: add entropy (and credit it) to the pool.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// What applying a `Resume` asks of the kernel (a trait so the order and
/// the refusals can be tested without being PID 1 of a VM).
pub trait Kernel {
    fn add_entropy(&mut self, bytes: &[u8]) -> io::Result<()>;
    fn reseed(&mut self) -> io::Result<()>;
    fn set_clock(&mut self, time_ns: u64) -> io::Result<()>;
    fn set_hostname(&mut self, name: &str) -> io::Result<()>;
}

/// Check `r` against the VM's `generation`, take its generation, and apply
/// it. On an error the VM must not run a job (its random state may be the
/// snapshot's).
pub fn apply(r: &Resume, generation: &mut u64, kernel: &mut impl Kernel) -> Result<()> {
    r.check(*generation).map_err(Error::BadResume)?;
    *generation = r.generation;
    let fail = |what: &'static str| move |source| Error::Identity { what, source };
    kernel
        .add_entropy(&r.entropy)
        .map_err(fail("add the host's entropy (RNDADDENTROPY)"))?;
    kernel
        .reseed()
        .map_err(fail("reseed the CRNG (RNDRESEEDCRNG)"))?;
    kernel
        .set_clock(r.time_ns)
        .map_err(fail("set the clock (clock_settime)"))?;
    kernel
        .set_hostname(&r.hostname)
        .map_err(fail("set the host name"))?;
    Ok(())
}

/// The `struct rand_pool_info` for `bytes`: `entropy_count` (bits
/// credited), `buf_size` (bytes), then the bytes.
pub fn pool_info(bytes: &[u8]) -> Vec<u8> {
    // `bytes` is at most `MAX_RESUME_ENTROPY` long (checked): no overflow.
    let len = bytes.len() as i32;
    let mut v = Vec::with_capacity(8 + bytes.len());
    v.extend_from_slice(&(len * 8).to_ne_bytes());
    v.extend_from_slice(&len.to_ne_bytes());
    v.extend_from_slice(bytes);
    v
}

/// `CLOCK_REALTIME` nanoseconds as a `timespec`.
pub fn timespec(time_ns: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: (time_ns / 1_000_000_000) as _,
        tv_nsec: (time_ns % 1_000_000_000) as _,
    }
}

/// The guest's kernel, through `/dev/urandom` and the clock.
pub struct Guest;

impl Guest {
    fn urandom_ioctl(request: libc::c_ulong, arg: *const u8) -> io::Result<()> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/urandom")?;
        // SAFETY: `f` is an open descriptor for the life of the call; `arg`
        // is null (RNDRESEEDCRNG takes none) or points to a whole
        // `rand_pool_info` (`pool_info`) that outlives the call, and the
        // kernel only reads `buf_size` bytes after its header.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), request as _, arg) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Kernel for Guest {
    fn add_entropy(&mut self, bytes: &[u8]) -> io::Result<()> {
        let info = pool_info(bytes);
        Guest::urandom_ioctl(RNDADDENTROPY, info.as_ptr())
    }

    fn reseed(&mut self) -> io::Result<()> {
        Guest::urandom_ioctl(RNDRESEEDCRNG, std::ptr::null())
    }

    fn set_clock(&mut self, time_ns: u64) -> io::Result<()> {
        let ts = timespec(time_ns);
        // SAFETY: `ts` is a valid `timespec` on the stack for the call.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn set_hostname(&mut self, name: &str) -> io::Result<()> {
        rustix::system::sethostname(name.as_bytes()).map_err(io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        calls: Vec<String>,
        fail_reseed: bool,
    }

    impl Kernel for Recorder {
        fn add_entropy(&mut self, bytes: &[u8]) -> io::Result<()> {
            self.calls.push(format!("entropy {}", bytes.len()));
            Ok(())
        }
        fn reseed(&mut self) -> io::Result<()> {
            self.calls.push("reseed".into());
            if self.fail_reseed {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            Ok(())
        }
        fn set_clock(&mut self, time_ns: u64) -> io::Result<()> {
            self.calls.push(format!("clock {time_ns}"));
            Ok(())
        }
        fn set_hostname(&mut self, name: &str) -> io::Result<()> {
            self.calls.push(format!("hostname {name}"));
            Ok(())
        }
    }

    fn resume(generation: u64) -> Resume {
        Resume {
            generation,
            entropy: vec![0xa5; 64],
            time_ns: 1_764_500_000_123_456_789,
            hostname: "runner-1".into(),
            rootfstype: "ext4".into(),
            workdir: String::new(),
            no_scratch: false,
        }
    }

    #[test]
    fn entropy_then_reseed_then_clock_then_name() {
        let (mut k, mut generation) = (Recorder::default(), 0);
        apply(&resume(5), &mut generation, &mut k).unwrap();
        assert_eq!(
            k.calls,
            [
                "entropy 64",
                "reseed",
                "clock 1764500000123456789",
                "hostname runner-1"
            ]
        );
        assert_eq!(generation, 5);
    }

    #[test]
    fn a_vm_is_resumed_once() {
        let (mut k, mut generation) = (Recorder::default(), 0);
        apply(&resume(5), &mut generation, &mut k).unwrap();
        let calls = k.calls.len();
        for again in [5, 4, 0] {
            let e = apply(&resume(again), &mut generation, &mut k).unwrap_err();
            assert!(matches!(e, Error::BadResume(_)), "{e:?}");
        }
        assert_eq!(k.calls.len(), calls, "a refused Resume changes nothing");
        assert_eq!(generation, 5);
    }

    #[test]
    fn a_half_applied_resume_is_not_applied_again() {
        let mut k = Recorder {
            fail_reseed: true,
            ..Recorder::default()
        };
        let mut generation = 0;
        let e = apply(&resume(9), &mut generation, &mut k).unwrap_err();
        assert!(e.render().contains("RNDRESEEDCRNG"), "{}", e.render());
        assert_eq!(k.calls, ["entropy 64", "reseed"], "stops at the failure");
        assert!(apply(&resume(9), &mut generation, &mut k).is_err());
    }

    #[test]
    fn rand_pool_info_layout() {
        let info = pool_info(&[1, 2, 3, 4]);
        assert_eq!(&info[..4], &32i32.to_ne_bytes(), "bits credited");
        assert_eq!(&info[4..8], &4i32.to_ne_bytes(), "bytes");
        assert_eq!(&info[8..], &[1, 2, 3, 4]);
    }

    #[test]
    fn nanoseconds_to_timespec() {
        let ts = timespec(1_764_500_000_123_456_789);
        assert_eq!((ts.tv_sec, ts.tv_nsec), (1_764_500_000, 123_456_789));
    }
}
