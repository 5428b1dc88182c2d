//! Launching data-parallel training: one process per GPU.
//!
//! - On one host, `bayeslora train --gpus N` calls [`spawn_local`]: it starts N copies of the
//!   running binary with the same arguments and torchrun's variables (`RANK`, `LOCAL_RANK`,
//!   `WORLD_SIZE`, `MASTER_ADDR` = 127.0.0.1, `MASTER_PORT` = a free port) and
//!   `NCCL_NVLS_ENABLE=0` (NVLink multicast off, as the GPU machines need), waits for all, and stops
//!   the others as soon as one fails.
//! - On several hosts, start one process per GPU with torchrun (or any launcher that sets the same
//!   variables): [`Launch::from_env`] reads them.
//!
//! Each process then trains on `cuda:LOCAL_RANK` (`train::run_data_parallel` over NCCL, feature
//! `nccl`). The NCCL unique id is made by rank 0 and handed to the others over TCP at
//! `MASTER_ADDR:MASTER_PORT` ([`rendezvous`]): 128 bytes, once, before the communicator exists.
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// Bytes of an NCCL unique id (`ncclUniqueId`).
pub const ID_BYTES: usize = 128;

/// How long ranks wait for each other at the rendezvous.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(300);

/// Where this process sits in a data-parallel group (torchrun's variables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    /// The GPU of this process on its host (`cuda:LOCAL_RANK`).
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl Launch {
    /// The group this process belongs to, from `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`
    /// and `MASTER_PORT`; `None` when `WORLD_SIZE` is unset or 1 (a single process).
    pub fn from_env() -> Result<Option<Launch>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Self::from_env`] over any source of variables (tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let num = |k: &str| -> Result<Option<usize>> {
            var(k)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        Error::Distributed(format!("{k}={v:?} is not a number (set by torchrun or `train --gpus`)"))
                    })
                })
                .transpose()
        };
        let world_size = match num("WORLD_SIZE")? {
            None | Some(0) | Some(1) => return Ok(None),
            Some(w) => w,
        };
        let need = |k: &str| -> Result<usize> {
            num(k)?.ok_or_else(|| Error::Distributed(format!("WORLD_SIZE is {world_size} but {k} is not set")))
        };
        let rank = need("RANK")?;
        if rank >= world_size {
            return Err(Error::Distributed(format!("RANK {rank} is not below WORLD_SIZE {world_size}")));
        }
        let local_rank = num("LOCAL_RANK")?.unwrap_or(rank);
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = need("MASTER_PORT")?;
        let master_port =
            u16::try_from(port).map_err(|_| Error::Distributed(format!("MASTER_PORT {port} is not a TCP port")))?;
        Ok(Some(Launch { rank, world_size, local_rank, master_addr, master_port }))
    }
}

/// Hands rank 0's `id` to every rank: rank 0 passes `Some(id)`, listens on `MASTER_PORT` and
/// sends the bytes to each of the other `world_size − 1` ranks; they pass `None`, connect to
/// `MASTER_ADDR:MASTER_PORT` (retrying while rank 0 starts) and read them. Every rank returns the
/// same bytes.
pub fn rendezvous(launch: &Launch, id: Option<[u8; ID_BYTES]>) -> Result<[u8; ID_BYTES]> {
    let addr = format!("{}:{}", launch.master_addr, launch.master_port);
    let io = |what: &str, e: std::io::Error| Error::Distributed(format!("rank {} {what} {addr}: {e}", launch.rank));
    if launch.rank == 0 {
        let id = id.ok_or_else(|| Error::Distributed("rank 0 needs the id to hand out".into()))?;
        let listener = TcpListener::bind(("0.0.0.0", launch.master_port)).map_err(|e| io("cannot listen on", e))?;
        listener.set_nonblocking(true).map_err(|e| io("cannot listen on", e))?;
        let start = Instant::now();
        let mut served = 0;
        while served + 1 < launch.world_size {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false).map_err(|e| io("cannot serve on", e))?;
                    stream.write_all(&id).map_err(|e| io("cannot send the NCCL id on", e))?;
                    served += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if start.elapsed() > RENDEZVOUS_TIMEOUT {
                        return Err(Error::Distributed(format!(
                            "rank 0: only {served} of {} ranks reached {addr} within {} s",
                            launch.world_size - 1,
                            RENDEZVOUS_TIMEOUT.as_secs()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(io("cannot accept on", e)),
            }
        }
        Ok(id)
    } else {
        let start = Instant::now();
        loop {
            match TcpStream::connect(&addr) {
                Ok(mut stream) => {
                    let mut id = [0u8; ID_BYTES];
                    stream.read_exact(&mut id).map_err(|e| io("cannot read the NCCL id from", e))?;
                    return Ok(id);
                }
                Err(e) if start.elapsed() > RENDEZVOUS_TIMEOUT => return Err(io("cannot reach rank 0 at", e)),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// A free TCP port on this host for the rendezvous.
fn free_port() -> Result<u16> {
    let l = TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| Error::Distributed(format!("no free TCP port for the rendezvous: {e}")))?;
    Ok(l.local_addr().map_err(|e| Error::Distributed(e.to_string()))?.port())
}

/// Exit code of a run stopped by Ctrl-C (128 + SIGINT), as `train` returns it.
pub const INTERRUPTED: i32 = 130;

/// Runs `gpus` copies of this binary with `args`, one per GPU of this host, as ranks 0..gpus of
/// one group, and waits for them: `Ok(0)` when all succeed, `Ok(INTERRUPTED)` after Ctrl-C (every
/// rank stops at its step), an error naming the rank when one fails (the others are stopped,
/// since they would wait for it forever). The children inherit stdout and stderr; only rank 0
/// prints results.
pub fn spawn_local(gpus: usize, args: &[OsString]) -> Result<i32> {
    if gpus < 2 {
        return Err(Error::Distributed(format!("--gpus {gpus}: spawn at least 2 processes, or run one directly")));
    }
    let exe = std::env::current_exe().map_err(|e| Error::Distributed(format!("cannot find this binary: {e}")))?;
    let port = free_port()?;
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(gpus);
    for rank in 0..gpus {
        let child = Command::new(&exe)
            .args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", gpus.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("NCCL_NVLS_ENABLE", "0")
            .spawn();
        match child {
            Ok(c) => children.push((rank, c)),
            Err(e) => {
                stop_all(&mut children);
                return Err(Error::Distributed(format!("cannot start rank {rank} ({}): {e}", exe.display())));
            }
        }
    }
    // Poll: the first rank that fails stops the others (they would wait for it forever).
    loop {
        let mut running = 0;
        for i in 0..children.len() {
            let (rank, child) = &mut children[i];
            match child.try_wait() {
                Ok(Some(status)) if status.code() == Some(INTERRUPTED) => {
                    // Ctrl-C reached the whole group: let every rank stop at its step (rank 0
                    // writes the checkpoint), then report the interruption.
                    for (_, c) in children.iter_mut() {
                        let _ = c.wait();
                    }
                    return Ok(INTERRUPTED);
                }
                Ok(Some(status)) if !status.success() => {
                    let rank = *rank;
                    stop_all(&mut children);
                    return Err(Error::Distributed(format!(
                        "rank {rank} exited with {status} (its error is printed above); the other ranks were stopped"
                    )));
                }
                Ok(Some(_)) => {}
                Ok(None) => running += 1,
                Err(e) => {
                    let rank = *rank;
                    stop_all(&mut children);
                    return Err(Error::Distributed(format!("waiting for rank {rank}: {e}")));
                }
            }
        }
        if running == 0 {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stop_all(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        if let Ok(None) = c.try_wait() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn reads_torchrun_variables() {
        assert_eq!(Launch::from_vars(vars(&[])).unwrap(), None);
        assert_eq!(Launch::from_vars(vars(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(), None);
        let l = Launch::from_vars(vars(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.2"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank, l.master_port), (3, 4, 1, 29500));
        assert_eq!(l.master_addr, "10.0.0.2");
        for (bad, says) in [
            (vec![("WORLD_SIZE", "2"), ("MASTER_PORT", "1")], "RANK is not set"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")], "not below WORLD_SIZE"),
            (vec![("WORLD_SIZE", "two")], "is not a number"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "70000")], "not a TCP port"),
        ] {
            let e = Launch::from_vars(vars(&bad)).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn rendezvous_hands_rank_0s_id_to_every_rank() {
        let port = free_port().unwrap();
        let world = 4;
        let mut id = [0u8; ID_BYTES];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let launch = Launch {
                    rank,
                    world_size: world,
                    local_rank: rank,
                    master_addr: "127.0.0.1".into(),
                    master_port: port,
                };
                std::thread::spawn(move || rendezvous(&launch, (rank == 0).then_some(id)))
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().unwrap(), id);
        }
    }

    #[test]
    fn spawn_local_needs_two_or_more() {
        assert!(spawn_local(1, &[]).unwrap_err().to_string().contains("at least 2"));
    }
}
