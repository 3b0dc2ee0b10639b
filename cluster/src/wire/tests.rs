//! The protocol's codec tests: every message round-trips, damaged messages are errors, garbage
//! never panics.

use super::*;
use proptest::prelude::*;
use transport::codec::Writer;

fn sampling() -> impl Strategy<Value = SamplingParams> {
    (
        0.0f32..2.0,
        proptest::option::of(1usize..100),
        proptest::option::of(0.0f32..1.0),
        proptest::option::of(0.0f32..1.0),
        -2.0f32..2.0,
        any::<u64>(),
    )
        .prop_map(|(t, k, p, m, pen, seed)| SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            min_p: m,
            presence_penalty: pen,
            frequency_penalty: -pen,
            repetition_penalty: 1.0 + pen.abs(),
            seed,
        })
}

fn logprob() -> impl Strategy<Value = TokenLogprob> {
    (
        any::<u32>(),
        -50.0f32..0.0,
        proptest::collection::vec((any::<u32>(), -50.0f32..0.0), 0..4),
    )
        .prop_map(|(token, logprob, top)| TokenLogprob {
            token,
            logprob,
            top,
        })
}

fn batch() -> impl Strategy<Value = Batch> {
    let open = proptest::option::of((
        any::<u32>(),
        sampling(),
        proptest::option::of(0u8..21),
        proptest::option::of(0u8..21),
        proptest::collection::vec(any::<u32>(), 0..20),
    ));
    let chunk = (
        any::<u64>(),
        any::<u32>(),
        1u32..5,
        0u8..3,
        any::<bool>(),
        open,
    );
    (
        any::<u64>(),
        any::<u64>(),
        proptest::collection::vec(any::<u64>(), 0..5),
        proptest::collection::vec(chunk, 0..5),
        1u32..6,
        any::<bool>(),
    )
        .prop_map(|(id, epoch, releases, chunks, width, bf16)| {
            let chunks: Vec<ChunkDesc> = chunks
                .into_iter()
                .map(|(seq, pos, rows, l, sample, open)| ChunkDesc {
                    seq,
                    pos,
                    rows,
                    logits: [Rows::Skip, Rows::Last, Rows::All][l as usize],
                    sample,
                    open: open.map(
                        |(reserve, sampling, logprobs, prompt_logprobs, prompt)| Open {
                            reserve,
                            sampling,
                            logprobs,
                            prompt_logprobs,
                            prompt,
                        },
                    ),
                })
                .collect();
            let n = chunks.iter().map(|c| c.rows as usize).sum::<usize>() * width as usize;
            let vals: Vec<f32> = (0..n).map(|i| i as f32 * 0.25 - 3.0).collect();
            let data = if bf16 {
                HiddenData::Bf16(vals.iter().map(|&v| half::bf16::from_f32(v)).collect())
            } else {
                HiddenData::F32(vals)
            };
            Batch {
                id,
                epoch,
                releases,
                chunks,
                timings: vec![
                    StageTiming {
                        step_us: width * 7,
                        sent_bytes: n as u32 * 4,
                    };
                    (id % 3) as usize
                ],
                hidden: Hidden { width, data },
            }
        })
}

fn link_report() -> impl Strategy<Value = LinkReport> {
    ("[a-z]{0,6}", any::<u32>(), any::<u64>()).prop_map(|(transport, rtt_us, bytes_per_s)| {
        LinkReport {
            transport,
            rtt_us,
            bytes_per_s,
        }
    })
}

fn msg() -> impl Strategy<Value = Msg> {
    let file = ("[a-z.]{1,12}", any::<u64>(), any::<[u8; 32]>())
        .prop_map(|(name, size, hash)| ModelFile { name, size, hash });
    let rate = ("[a-z0-9_]{1,6}", any::<u64>(), any::<u64>()).prop_map(
        |(format, bytes_per_s, call_ns)| Rate {
            format,
            bytes_per_s,
            call_ns,
        },
    );
    let advert = (
        any::<u16>(),
        "[a-z-]{0,10}",
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        "[a-z0-9 ]{0,20}",
        proptest::collection::vec(file, 0..3),
        ("[0-9a-f]{0,16}", proptest::collection::vec(rate, 0..4)),
    )
        .prop_map(
            |(version, hostname, mem_total, mem_available, cores, cpu_features, files, v2)| {
                // a version-1 advert has no id or rates, a version-2 advert no cost per product
                let (node_id, mut speed) = if version >= 2 { v2 } else { Default::default() };
                if version < 3 {
                    speed.iter_mut().for_each(|r: &mut Rate| r.call_ns = 0);
                }
                Msg::Advert(Advert {
                    version,
                    hostname,
                    mem_total,
                    mem_available,
                    cores,
                    cpu_features,
                    files,
                    node_id,
                    speed,
                })
            },
        );
    let assign = (
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        "[a-z.]{0,12}",
        any::<[u8; 32]>(),
        any::<u32>(),
        any::<u64>(),
        proptest::option::of("[0-9.:]{1,21}"),
        any::<u64>(),
    )
        .prop_map(
            |(
                stage,
                stages,
                layer_start,
                layer_end,
                model_name,
                model_hash,
                ctx,
                kv_bytes,
                next,
                epoch,
            )| {
                Msg::Assign(Assign {
                    stage,
                    stages,
                    layer_start,
                    layer_end,
                    model_name,
                    model_hash,
                    ctx,
                    kv_bytes,
                    next,
                    epoch,
                })
            },
        );
    let result = (
        any::<u64>(),
        proptest::option::of(any::<u32>()),
        proptest::option::of(logprob()),
        proptest::collection::vec(logprob(), 0..3),
        proptest::option::of("[a-z ]{0,20}"),
    )
        .prop_map(|(seq, token, logprob, prompt_logprobs, error)| SeqResult {
            seq,
            token,
            logprob,
            prompt_logprobs,
            error,
        });
    prop_oneof![
        (any::<u16>(), any::<u64>())
            .prop_map(|(version, head_id)| Msg::HeadHello { version, head_id }),
        advert,
        ".{0,40}".prop_map(Msg::Refuse),
        assign,
        Just(Msg::NeedWeights),
        (any::<u64>(), any::<[u8; 32]>()).prop_map(|(size, hash)| Msg::WeightsBegin { size, hash }),
        (
            any::<u64>(),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(offset, crc, bytes)| Msg::WeightsChunk { offset, crc, bytes }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(link_report())
        )
            .prop_map(|(a, b, c, l)| Msg::Ready(Ready {
                kv_capacity_tokens: a,
                load_ms: b,
                received_bytes: c,
                next_link: l,
            })),
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(id, pad)| Msg::Probe { id, pad }),
        (any::<u64>(), any::<u64>()).prop_map(|(id, bytes)| Msg::ProbeAck { id, bytes }),
        any::<u64>().prop_map(Msg::Ping),
        any::<u64>().prop_map(Msg::Pong),
        proptest::collection::vec(
            ("[a-z0-9_]{1,6}", any::<u64>(), any::<u64>()).prop_map(
                |(format, bytes_per_s, call_ns)| Rate {
                    format,
                    bytes_per_s,
                    call_ns
                }
            ),
            0..4
        )
        .prop_map(Msg::Rates),
        batch().prop_map(Msg::Batch),
        (any::<u64>(), proptest::collection::vec(result, 0..4)).prop_map(|(id, results)| {
            Msg::Sampled(Sampled {
                id,
                timings: vec![
                    StageTiming {
                        step_us: id as u32,
                        sent_bytes: 3
                    };
                    results.len()
                ],
                results,
            })
        }),
        ".{0,40}".prop_map(Msg::StageError),
        (any::<u16>(), any::<u64>(), any::<u32>()).prop_map(|(version, epoch, stage)| {
            Msg::PeerHello {
                version,
                epoch,
                stage,
            }
        }),
        any::<u16>().prop_map(|version| Msg::Survey { version }),
        "[0-9.:]{1,21}".prop_map(Msg::ProbePeer),
        any::<u64>().prop_map(|bytes| Msg::SampleNext { bytes }),
        proptest::result::maybe_ok(link_report(), ".{0,30}").prop_map(Msg::LinkSample),
    ]
}

proptest! {
    #[test]
    fn every_message_round_trips(m in msg()) {
        let (tag, payload) = m.encode();
        prop_assert_eq!(Msg::decode(tag, &payload).unwrap(), m);
    }

    #[test]
    fn truncated_or_extended_messages_are_errors(m in msg(), cut in any::<proptest::sample::Index>(), extra in 1usize..4) {
        let (tag, payload) = m.encode();
        if !payload.is_empty() {
            let at = cut.index(payload.len());
            // a prefix may decode only if it is the whole message
            if let Ok(d) = Msg::decode(tag, &payload[..at]) {
                // a weights chunk's bytes run to the end: a prefix is a shorter chunk
                prop_assert!(matches!(d, Msg::WeightsChunk { .. } | Msg::Probe { .. }), "prefix decoded to {d:?}");
            }
        }
        let mut long = payload.clone();
        long.extend(std::iter::repeat_n(0u8, extra));
        if let Ok(d) = Msg::decode(tag, &long) {
            prop_assert!(matches!(d, Msg::WeightsChunk { .. } | Msg::Probe { .. }), "extended decoded to {d:?}");
        }
    }

    #[test]
    fn garbage_never_panics(tag in 0x5100u32..0x5118, payload in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = Msg::decode(tag, &payload);
    }
}

#[test]
fn a_huge_count_is_refused_before_allocating() {
    let mut b = Vec::new();
    b.put_u64(1);
    b.put_u64(2);
    b.put_u32(u32::MAX); // releases
    let e = Msg::decode(T_BATCH, &b).unwrap_err();
    assert!(e.to_string().contains("release count"), "{e}");
}

#[test]
fn unknown_tags_are_errors() {
    assert!(Msg::decode(7, &[]).is_err());
}
