//! Every operation against a serial reference, for world sizes 1 to 8 (ranks as threads over
//! real loopback links), and the failure semantics: a dead or stalled rank fails every survivor
//! within the deadline, and the communicator stays poisoned.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use half::{bf16, f16};
use proptest::prelude::*;
use transport::{ClusterKey, LinkConfig};

use crate::element::reduce_into;
use crate::schedule::{chunk, reduce_scatter_order};
use crate::{
    AllReduceAlgorithm, CollectiveError, CommConfig, Communicator, Reduce, ReduceOp,
    rendezvous::rendezvous,
};

type Job = Box<dyn FnOnce(&mut Communicator) -> Result<Vec<u8>, String> + Send>;

/// A world of ranks, each a thread that runs the jobs it is sent.
struct World {
    jobs: Vec<Sender<Job>>,
    results: Vec<Receiver<Result<Vec<u8>, String>>>,
}

fn link_config() -> LinkConfig {
    let mut cfg = LinkConfig::new(ClusterKey::from_bytes(&[7u8; 32]).unwrap());
    // Small rings: 28 links of a world of 8 stay cheap.
    cfg.shm_ring_bytes = 64 << 10;
    cfg
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Communicators of a fresh world of `n`, one per rank, built by rendezvous from threads.
fn build(n: usize, config: CommConfig) -> Vec<Communicator> {
    let root = free_addr();
    let handles: Vec<_> = (0..n)
        .map(|r| {
            let (root, config) = (root.clone(), config.clone());
            thread::spawn(move || {
                rendezvous(&root, r, n, &link_config(), config, Duration::from_secs(30)).unwrap()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Small pieces and a small direct threshold, so tiny inputs exercise pipelining and the ring:
/// messages up to 24 bytes go whole, up to 192 bytes in two pieces (each direction of a ring
/// step cut by its own length, which may differ by an element), longer ones in 96-byte pieces.
fn test_config() -> CommConfig {
    CommConfig {
        timeout: Duration::from_secs(10),
        piece_bytes: 96,
        min_piece_bytes: 24,
        small_bytes: 48,
    }
}

impl World {
    fn new(n: usize) -> World {
        let mut jobs = Vec::new();
        let mut results = Vec::new();
        for mut comm in build(n, test_config()) {
            let (jtx, jrx) = channel::<Job>();
            let (rtx, rrx) = channel();
            thread::spawn(move || {
                for job in jrx {
                    if rtx.send(job(&mut comm)).is_err() {
                        return;
                    }
                }
            });
            jobs.push(jtx);
            results.push(rrx);
        }
        World { jobs, results }
    }

    /// Runs `job(rank)` on every rank and returns each rank's result. After a failed operation
    /// (its communicators are poisoned) the world is rebuilt, so one failing test case does not
    /// fail every later one that shares the world.
    fn run(&mut self, job: impl Fn(usize) -> Job) -> Vec<Result<Vec<u8>, String>> {
        for (r, tx) in self.jobs.iter().enumerate() {
            tx.send(job(r)).unwrap();
        }
        let results: Vec<_> = self
            .results
            .iter()
            .map(|rx| {
                rx.recv_timeout(Duration::from_secs(60))
                    .expect("a rank hung")
            })
            .collect();
        if results.iter().any(|r| r.is_err()) {
            *self = World::new(self.jobs.len());
        }
        results
    }
}

/// The shared world of `n` ranks, locked; rebuilt when a test panicked while holding it (its
/// ranks may be mid-operation).
fn world(n: usize) -> MutexGuard<'static, World> {
    static WORLDS: OnceLock<Vec<Mutex<World>>> = OnceLock::new();
    let m = &WORLDS.get_or_init(|| (1..=8).map(|n| Mutex::new(World::new(n))).collect())[n - 1];
    m.lock().unwrap_or_else(|poisoned| {
        m.clear_poison();
        let mut w = poisoned.into_inner();
        *w = World::new(n);
        w
    })
}

fn bytes<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

fn ok(results: Vec<Result<Vec<u8>, String>>) -> Vec<Vec<u8>> {
    results.into_iter().map(|r| r.unwrap()).collect()
}

/// Per-rank inputs of `len` elements, built from `seed`.
fn inputs<T: Copy>(n: usize, len: usize, seed: u64, make: impl Fn(u64) -> T) -> Vec<Vec<T>> {
    (0..n)
        .map(|r| {
            (0..len)
                .map(|i| {
                    make(
                        seed.wrapping_mul(6364136223846793005)
                            .wrapping_add((r * 1_000_003 + i) as u64),
                    )
                })
                .collect()
        })
        .collect()
}

fn float(x: u64) -> f32 {
    // Spread over magnitudes and signs, so rounding differs with the order of additions.
    let m = ((x >> 11) % 2001) as f32 - 1000.0;
    m * [1e-3f32, 1.0, 1e3][(x % 3) as usize]
}

/// The reference all-reduce, folding in the order the communicator documents.
fn reference_all_reduce<T: Reduce>(
    inputs: &[Vec<T>],
    op: ReduceOp,
    algorithm: AllReduceAlgorithm,
) -> Vec<T> {
    let n = inputs.len();
    let len = inputs[0].len();
    match algorithm {
        AllReduceAlgorithm::Direct => {
            let mut acc = inputs[0].clone();
            for x in &inputs[1..] {
                reduce_into(op, &mut acc, x);
            }
            acc
        }
        AllReduceAlgorithm::Ring => {
            let mut out = inputs[0].clone();
            for k in 0..n {
                let range = chunk(len, n, k);
                let mut order = reduce_scatter_order(n, k);
                let first = order.next().unwrap();
                let mut acc = inputs[first][range.clone()].to_vec();
                for r in order {
                    reduce_into(op, &mut acc, &inputs[r][range.clone()]);
                }
                out[range].copy_from_slice(&acc);
            }
            out
        }
    }
}

fn algorithm_for(n: usize, bytes: usize) -> AllReduceAlgorithm {
    if n <= 1 || bytes <= test_config().small_bytes {
        AllReduceAlgorithm::Direct
    } else {
        AllReduceAlgorithm::Ring
    }
}

fn check_all_reduce<T: Reduce>(
    n: usize,
    data: Vec<Vec<T>>,
    op: ReduceOp,
) -> Result<(), TestCaseError> {
    let algorithm = algorithm_for(n, std::mem::size_of::<T>() * data[0].len());
    let expected = bytes(&reference_all_reduce(&data, op, algorithm));
    let mut w = world(n);
    let got = ok(w.run(|r| {
        let mut buf = data[r].clone();
        Box::new(move |c| {
            c.all_reduce(&mut buf, op).map_err(|e| e.to_string())?;
            Ok(bytes(&buf))
        })
    }));
    for (r, g) in got.iter().enumerate() {
        prop_assert_eq!(g, &expected, "rank {} of {} ({:?})", r, n, algorithm);
    }
    // out of place, into an output holding garbage: the same bits, the input untouched
    let got = ok(w.run(|r| {
        let input = data[r].clone();
        Box::new(move |c| {
            let kept = bytes(&input);
            let mut out = vec![T::zeroed(); input.len()];
            bytemuck::cast_slice_mut::<T, u8>(&mut out).fill(0xA5);
            c.all_reduce_into(&input, &mut out, op)
                .map_err(|e| e.to_string())?;
            if bytes(&input) != kept {
                return Err("all_reduce_into changed its input".into());
            }
            Ok(bytes(&out))
        })
    }));
    for (r, g) in got.iter().enumerate() {
        prop_assert_eq!(
            g,
            &expected,
            "out of place, rank {} of {} ({:?})",
            r,
            n,
            algorithm
        );
    }
    Ok(())
}

fn lengths() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(1),
        Just(2),
        Just(3),
        Just(7),
        Just(13),
        Just(31),
        0usize..200
    ]
}

fn reduce_ops() -> impl Strategy<Value = ReduceOp> {
    prop_oneof![
        Just(ReduceOp::Sum),
        Just(ReduceOp::Max),
        Just(ReduceOp::Min)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn all_reduce_f32_equals_the_serial_reference_bitwise(n in 1usize..=8, len in lengths(), seed: u64, op in reduce_ops()) {
        check_all_reduce(n, inputs(n, len, seed, float), op)?;
    }

    #[test]
    fn all_reduce_f16_and_bf16_equal_the_serial_reference_bitwise(n in 1usize..=8, len in lengths(), seed: u64, op in reduce_ops()) {
        check_all_reduce(n, inputs(n, len, seed, |x| f16::from_f32(float(x) / 100.0)), op)?;
        check_all_reduce(n, inputs(n, len, seed, |x| bf16::from_f32(float(x))), op)?;
    }

    #[test]
    fn reduce_scatter_gives_each_rank_its_chunk_of_the_reference(n in 1usize..=8, len in lengths(), seed: u64, op in reduce_ops()) {
        let data = inputs(n, len, seed, float);
        let full = reference_all_reduce(&data, op, AllReduceAlgorithm::Ring);
        let mut w = world(n);
        let got = ok(w.run(|r| {
            let input = data[r].clone();
            Box::new(move |c| {
                let mut out = vec![0f32; chunk(input.len(), c.world(), c.rank()).len()];
                c.reduce_scatter(&input, &mut out, op).map_err(|e| e.to_string())?;
                Ok(bytes(&out))
            })
        }));
        for (r, g) in got.iter().enumerate() {
            prop_assert_eq!(g, &bytes(&full[chunk(len, n, r)]));
        }
    }

    #[test]
    fn all_gather_and_broadcast_copy_bitwise(n in 1usize..=8, len in lengths(), seed: u64, root_pick: usize) {
        let data = inputs(n, len, seed, |x| (x >> 7) as u8);
        let expected: Vec<u8> = data.concat();
        let root = root_pick % n;
        let mut w = world(n);
        let got = ok(w.run(|r| {
            let input = data[r].clone();
            Box::new(move |c| {
                let mut out = vec![0u8; input.len() * c.world()];
                c.all_gather(&input, &mut out).map_err(|e| e.to_string())?;
                Ok(out)
            })
        }));
        for g in &got {
            prop_assert_eq!(g, &expected);
        }
        let got = ok(w.run(|r| {
            let mut buf = if r == root { data[root].clone() } else { vec![0u8; len] };
            Box::new(move |c| {
                c.broadcast(root, &mut buf).map_err(|e| e.to_string())?;
                Ok(buf)
            })
        }));
        for g in &got {
            prop_assert_eq!(g, &data[root]);
        }
    }

    #[test]
    fn all_to_all_with_uneven_counts_delivers_every_block(n in 1usize..=8, seed: u64) {
        // counts[s][d]: elements rank s sends rank d.
        let counts: Vec<Vec<usize>> = (0..n)
            .map(|s| (0..n).map(|d| ((seed >> ((s * 8 + d) % 60)) as usize + s * 3 + d) % 9).collect())
            .collect();
        let block = |s: usize, d: usize| -> Vec<f32> { (0..counts[s][d]).map(|i| (s * 1000 + d * 100 + i) as f32).collect() };
        let mut w = world(n);
        let counts2 = counts.clone();
        let got = ok(w.run(|r| {
            let send: Vec<f32> = (0..n).flat_map(|d| block(r, d)).collect();
            let send_counts = counts2[r].clone();
            let recv_counts: Vec<usize> = (0..n).map(|s| counts2[s][r]).collect();
            Box::new(move |c| {
                let mut recv = vec![0f32; recv_counts.iter().sum()];
                c.all_to_all(&send, &send_counts, &mut recv, &recv_counts).map_err(|e| e.to_string())?;
                Ok(bytes(&recv))
            })
        }));
        for (r, g) in got.iter().enumerate() {
            let expected: Vec<f32> = (0..n).flat_map(|s| block(s, r)).collect();
            prop_assert_eq!(g, &bytes(&expected));
        }
    }

    #[test]
    fn send_and_recv_move_any_length_in_pieces(n in 2usize..=8, len in lengths(), seed: u64) {
        let data = inputs(1, len, seed, |x| x as u8).remove(0);
        let mut w = world(n);
        let got = ok(w.run(|r| {
            let data = data.clone();
            Box::new(move |c| {
                match r {
                    0 => c.send(1, &data).map(|_| Vec::new()),
                    1 => {
                        let mut buf = vec![0u8; data.len()];
                        c.recv(0, &mut buf).map(|_| buf)
                    }
                    _ => Ok(Vec::new()),
                }
                .map_err(|e| e.to_string())
            })
        }));
        prop_assert_eq!(&got[1], &data);
    }
}

#[test]
fn barrier_and_stats_record_every_operation() {
    let mut w = world(3);
    let got = ok(w.run(|_| {
        Box::new(|c| {
            c.stats_mut().clear();
            c.barrier().map_err(|e| e.to_string())?;
            let mut v = vec![1.0f32; 100];
            c.all_reduce(&mut v, ReduceOp::Sum)
                .map_err(|e| e.to_string())?;
            let s = c.stats().summary();
            Ok(format!(
                "{:?}",
                s.iter()
                    .map(|l| (l.op, l.size_class, l.count))
                    .collect::<Vec<_>>()
            )
            .into_bytes())
        })
    }));
    for g in got {
        assert_eq!(
            String::from_utf8(g).unwrap(),
            r#"[("all_reduce", 512, 1), ("barrier", 1, 1)]"#
        );
    }
}

#[test]
fn mismatched_lengths_are_an_error_on_both_ranks() {
    let mut comms = build(2, test_config());
    let c1 = comms.pop().unwrap();
    let mut c0 = comms.pop().unwrap();
    let t = thread::spawn(move || {
        let mut c1 = c1;
        let mut v = vec![0f32; 10];
        c1.all_reduce(&mut v, ReduceOp::Sum).map(|_| ())
    });
    let mut v = vec![0f32; 11];
    let e0 = c0.all_reduce(&mut v, ReduceOp::Sum).unwrap_err();
    let e1 = t.join().unwrap().unwrap_err();
    assert!(
        matches!(
            e0,
            CollectiveError::Mismatch { .. } | CollectiveError::Link { .. }
        ),
        "{e0}"
    );
    assert!(
        matches!(
            e1,
            CollectiveError::Mismatch { .. } | CollectiveError::Link { .. }
        ),
        "{e1}"
    );
}

/// Runs an all-reduce on ranks 0..n-1 while the last rank does `last` instead; returns each
/// survivor's result and how long it took.
fn survivors(
    n: usize,
    timeout: Duration,
    last: impl FnOnce(Communicator) + Send + 'static,
) -> Vec<(Result<(), CollectiveError>, Duration, Communicator)> {
    let config = CommConfig {
        timeout,
        ..CommConfig::default()
    };
    let mut comms = build(n, config);
    let victim = comms.pop().unwrap();
    let killer = thread::spawn(move || last(victim));
    let handles: Vec<_> = comms
        .into_iter()
        .map(|mut c| {
            thread::spawn(move || {
                let mut v = vec![1.0f32; 4 << 20];
                let t = Instant::now();
                let r = c.all_reduce(&mut v, ReduceOp::Sum);
                (r, t.elapsed(), c)
            })
        })
        .collect();
    let out = handles.into_iter().map(|h| h.join().unwrap()).collect();
    killer.join().unwrap();
    out
}

#[test]
fn a_rank_that_dies_mid_all_reduce_fails_every_survivor_promptly_and_poisons() {
    for n in [2, 3, 5] {
        let results = survivors(n, Duration::from_secs(5), |victim| {
            // The others are inside the all-reduce when this rank goes away.
            thread::sleep(Duration::from_millis(50));
            drop(victim);
        });
        for (r, took, mut c) in results {
            assert!(
                r.is_err(),
                "world {n}: a survivor succeeded without the dead rank"
            );
            assert!(
                took < Duration::from_secs(5),
                "world {n}: failed only after {took:?}"
            );
            let t = Instant::now();
            let again = c.barrier().unwrap_err();
            assert!(matches!(again, CollectiveError::Poisoned { .. }), "{again}");
            assert!(
                t.elapsed() < Duration::from_millis(100),
                "a poisoned communicator fails fast"
            );
        }
    }
}

#[test]
fn a_stalled_rank_fails_every_survivor_at_the_deadline() {
    let results = survivors(3, Duration::from_millis(500), |victim| {
        // Alive, links open, but never joins the operation.
        thread::sleep(Duration::from_secs(3));
        drop(victim);
    });
    for (r, took, _) in results {
        assert!(r.is_err());
        assert!(took < Duration::from_secs(2), "failed only after {took:?}");
    }
}

#[test]
fn a_ring_topology_runs_every_operation_but_all_to_all() {
    use crate::Topology;
    use crate::rendezvous::rendezvous_with;
    let n = 5;
    let root = free_addr();
    let data = inputs(n, 37, 11, float);
    let expected_sum = reference_all_reduce(&data, ReduceOp::Sum, AllReduceAlgorithm::Ring);
    let handles: Vec<_> = (0..n)
        .map(|r| {
            let (root, data, expected_sum) = (root.clone(), data.clone(), expected_sum.clone());
            thread::spawn(move || {
                let mut c = rendezvous_with(
                    &root,
                    r,
                    n,
                    &link_config(),
                    test_config(),
                    Duration::from_secs(30),
                    Topology::Ring,
                )
                .unwrap();
                assert_eq!(c.topology(), Topology::Ring);
                // Small inputs take the ring too: there is no link for the direct algorithm.
                assert_eq!(c.all_reduce_algorithm(4), AllReduceAlgorithm::Ring);
                c.barrier().unwrap();
                let mut v = data[r].clone();
                c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
                assert_eq!(bytes(&v), bytes(&expected_sum));
                let mut out = vec![0f32; 37 * n];
                c.all_gather(&data[r], &mut out).unwrap();
                assert_eq!(out, data.concat());
                let mut b = if r == 2 {
                    data[2].clone()
                } else {
                    vec![0f32; 37]
                };
                c.broadcast(2, &mut b).unwrap();
                assert_eq!(b, data[2]);
                c.barrier().unwrap();
                let err = c
                    .all_to_all(&[0f32; 5], &[1; 5], &mut [0f32; 5], &[1; 5])
                    .unwrap_err();
                assert!(
                    matches!(err, CollectiveError::InvalidArgument { .. }),
                    "{err}"
                );
                // Invalid arguments do not poison: the ring still works.
                c.barrier().unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}
