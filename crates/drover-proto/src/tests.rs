use super::*;
use proptest::prelude::*;

fn encode(m: &Message) -> BytesMut {
    let mut buf = BytesMut::new();
    Codec.encode(m.clone(), &mut buf).unwrap();
    buf
}

fn decode_all(mut buf: BytesMut) -> Result<Vec<Message>, ProtoError> {
    let mut out = Vec::new();
    while let Some(m) = Codec.decode(&mut buf)? {
        out.push(m);
    }
    assert!(buf.is_empty(), "{} bytes left undecoded", buf.len());
    Ok(out)
}

/// A seed's pull of cut "c" (nil ids, no limit) of a disk of `disk_size`, for `range`.
fn a_pull(disk_size: u64, range: Range) -> Pull {
    Pull {
        version: PROTOCOL_VERSION,
        transfer: Uuid::nil(),
        cut: "c".into(),
        instance: Uuid::nil(),
        mode: PullMode::Seed,
        disk_size,
        range,
        bandwidth_limit: None,
    }
}

fn samples() -> Vec<Message> {
    let transfer = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
    let data: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    vec![
        Message::Hello(Hello { version: PROTOCOL_VERSION, transfer, stream: 1, streams: 4, disk_size: 1 << 30 }),
        Message::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            acknowledged: vec![Range { offset: 0, length: 4 << 20 }, Range { offset: 8 << 20, length: 65536 }],
        }),
        Message::Welcome(Welcome { version: PROTOCOL_VERSION, acknowledged: vec![] }),
        Message::Data(Data::new(4096, &data, false)),
        Message::Data(Data::new(1 << 20, &data, true)),
        Message::Data(Data::new(0, &[], false)),
        Message::Zero(Range { offset: 1 << 30, length: 1 << 20 }),
        Message::Ack(Range { offset: 65536, length: 4 << 20 }),
        Message::Flush(7),
        Message::Flushed(7),
        Message::Hashes { offset: 0, block_size: 65536, hashes: vec![[1; 32], [2; 32], [0; 32]] },
        Message::Done { bytes: 123_456_789 },
        Message::Refused(Refused { code: RefusalCode::UnknownTransfer, message: "no transfer 42 here".into() }),
        Message::Refused(Refused { code: RefusalCode::UnknownCut, message: "no cut run1-0-0 here".into() }),
        Message::Pull(Pull {
            version: PROTOCOL_VERSION,
            transfer,
            cut: "run1-0-0".into(),
            instance: Uuid::from_u128(7),
            mode: PullMode::HashCompare,
            disk_size: 1 << 30,
            range: Range { offset: 0, length: 1 << 30 },
            bandwidth_limit: None,
        }),
        Message::Pull(Pull {
            version: PROTOCOL_VERSION,
            transfer,
            cut: "run1-0-0".into(),
            instance: Uuid::from_u128(7),
            mode: PullMode::Seed,
            disk_size: 1 << 30,
            range: Range { offset: 256 << 20, length: 256 << 20 },
            bandwidth_limit: Some(4 << 20),
        }),
        Message::Offer { bytes: 4 << 20, extents: 3 },
        Message::Survey(Pull {
            version: PROTOCOL_VERSION,
            transfer,
            cut: "run1-0-0".into(),
            instance: Uuid::from_u128(7),
            mode: PullMode::Bitmap,
            disk_size: 1 << 30,
            range: Range { offset: 0, length: 1 << 30 },
            bandwidth_limit: None,
        }),
        Message::Surveyed { granule: 1 << 20, bytes: vec![1 << 20, 0, 65536] },
        Message::Surveyed { granule: 65536, bytes: vec![] },
    ]
}

#[test]
fn a_pull_with_no_cut_id_or_a_long_one_is_malformed() {
    for cut in [String::new(), "x".repeat(MAX_CUT_ID + 1)] {
        let m = Message::Pull(Pull { cut, ..a_pull(1, Range { offset: 0, length: 1 }) });
        assert!(matches!(Codec.encode(m, &mut BytesMut::new()), Err(ProtoError::Malformed(_))));
    }
    // Decoding checks the same: a frame claiming a 0-byte cut id.
    let mut frame = BytesMut::new();
    frame.put_u32(1 + 2 + 16 + 16 + 1 + 8 + 2);
    frame.put_u8(11);
    frame.put_u16(PROTOCOL_VERSION);
    frame.put_slice(&[0; 32]);
    frame.put_u8(1);
    frame.put_u64(1);
    frame.put_u16(0);
    assert!(matches!(decode_all(frame), Err(ProtoError::Malformed(_))));
}

#[test]
fn a_pull_names_its_range_then_an_optional_limit_and_a_limit_of_0_is_malformed() {
    let pull = |bandwidth_limit| Pull { bandwidth_limit, ..a_pull(1 << 20, Range { offset: 65536, length: 131072 }) };
    // Golden: length, kind, version, transfer, instance, mode, size, cut id, range; no limit.
    let mut v2 = BytesMut::new();
    v2.put_u32(1 + 2 + 16 + 16 + 1 + 8 + 2 + 1 + 16);
    v2.put_u8(11);
    v2.put_u16(PROTOCOL_VERSION);
    v2.put_slice(&[0; 32]);
    v2.put_u8(1);
    v2.put_u64(1 << 20);
    v2.put_u16(1);
    v2.put_slice(b"c");
    v2.put_u64(65536);
    v2.put_u64(131072);
    assert_eq!(encode(&Message::Pull(pull(None))), v2);
    // With a limit, its u64 follows the range.
    let limited = encode(&Message::Pull(pull(Some(4 << 20))));
    assert_eq!(limited.len(), v2.len() + 8);
    assert_eq!(&limited[limited.len() - 8..], &(4u64 << 20).to_be_bytes());
    assert!(matches!(Codec.encode(Message::Pull(pull(Some(0))), &mut BytesMut::new()), Err(ProtoError::Malformed(_))));
    let mut zero = v2.clone();
    zero[..4].copy_from_slice(&(1u32 + 2 + 16 + 16 + 1 + 8 + 2 + 1 + 16 + 8).to_be_bytes());
    zero.put_u64(0);
    assert!(matches!(decode_all(zero), Err(ProtoError::Malformed(_))));
    // A truncated limit is malformed, not a limit of its first bytes.
    let mut short = v2.clone();
    short[..4].copy_from_slice(&(1u32 + 2 + 16 + 16 + 1 + 8 + 2 + 1 + 16 + 4).to_be_bytes());
    short.put_u32(7);
    assert!(matches!(decode_all(short), Err(ProtoError::Malformed(_))));
}

#[test]
fn a_pull_of_version_1_is_read_as_far_as_its_version_so_it_can_be_refused_for_it() {
    // What version 1 sent: no range, a limit after the cut id.
    let mut v1 = BytesMut::new();
    v1.put_u32(1 + 2 + 16 + 16 + 1 + 8 + 2 + 1 + 8);
    v1.put_u8(11);
    v1.put_u16(1);
    v1.put_slice(&[0; 32]);
    v1.put_u8(1);
    v1.put_u64(1 << 20);
    v1.put_u16(1);
    v1.put_slice(b"c");
    v1.put_u64(4 << 20);
    match decode_all(v1).unwrap().as_slice() {
        [Message::Pull(p)] => assert_eq!((p.version, p.cut.as_str(), p.disk_size), (1, "c", 1 << 20)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_message_round_trips_alone_and_in_a_stream() {
    let mut stream = BytesMut::new();
    for m in samples() {
        let one = encode(&m);
        assert!(decode_all(one.clone()).unwrap() == vec![m.clone()], "{:?} did not round-trip", kind_of(&m));
        stream.extend_from_slice(&one);
    }
    assert!(decode_all(stream).unwrap() == samples(), "the stream did not round-trip");
}

fn kind_of(m: &Message) -> String {
    format!("{m:?}").chars().take(60).collect()
}

#[test]
fn compressible_data_travels_compressed_and_comes_back_verified() {
    let plain = vec![7u8; 1 << 20];
    let d = Data::new(0, &plain, true);
    assert_eq!(d.compression, Compression::Zstd);
    assert!(d.payload.len() < plain.len() / 100, "{} bytes", d.payload.len());
    assert_eq!(d.verified().unwrap(), plain.as_slice());
    // Random-looking data is not worth compressing: sent as it is.
    let mut noise = vec![0u8; 65536];
    blake3::Hasher::new().update(b"noise").finalize_xof().fill(&mut noise);
    let d = Data::new(0, &noise, true);
    assert_eq!((d.compression, d.verified().unwrap().len()), (Compression::None, noise.len()));
    assert_eq!(d.payload, noise.as_slice());
    // Nearly random (97% noise, 3% zeroes): zstd saves under 5%, so the plain bytes travel.
    let mut nearly = noise.clone();
    nearly[..65536 * 3 / 100].fill(0);
    let z = zstd::bulk::compress(&nearly, 1).unwrap();
    assert!(z.len() < nearly.len(), "zstd does shrink it a little: {}", z.len());
    let d = Data::new(0, &nearly, true);
    assert_eq!(d.compression, Compression::None, "saving {} bytes is not worth it", nearly.len() - z.len());
    assert_eq!(d.verified().unwrap(), nearly.as_slice());
}

#[test]
fn a_truncated_frame_waits_for_more_and_never_yields_a_message() {
    for m in samples() {
        let full = encode(&m);
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert!(Codec.decode(&mut part).unwrap().is_none(), "{m:?} cut at {cut}");
        }
    }
}

#[test]
fn bytes_that_do_not_match_their_hash_are_refused() {
    let plain: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let mut d = Data::new(512, &plain, false);
    let mut tampered = d.payload.to_vec();
    tampered[5000] ^= 1;
    d.payload = Bytes::from(tampered);
    assert!(matches!(d.verified(), Err(ProtoError::HashMismatch { offset: 512 })));
    // A wrong hash over right bytes too.
    let mut d = Data::new(0, &plain, true);
    d.hashes[0][0] ^= 0xff;
    assert!(matches!(d.verified(), Err(ProtoError::HashMismatch { .. })));
}

#[test]
fn decompression_stops_at_the_declared_length() {
    // 4 MiB of zeroes compress to a few hundred bytes; a frame that declares 4 KiB must not make
    // the receiver inflate them.
    let bomb = Data::new(0, &vec![0u8; 4 << 20], true);
    let lying = Data { length: 4096, ..bomb };
    assert!(matches!(lying.verified(), Err(ProtoError::HashMismatch { .. })));
}

#[test]
fn oversized_unknown_and_malformed_frames_are_errors() {
    // A length over the limit is refused before anything is read or reserved.
    let mut big = BytesMut::new();
    big.put_u32(MAX_FRAME as u32 + 1);
    assert!(matches!(Codec.decode(&mut big), Err(ProtoError::FrameTooLarge(_))));
    let frame = |body: &[u8]| {
        let mut b = BytesMut::new();
        b.put_u32(body.len() as u32);
        b.put_slice(body);
        b
    };
    let cases: Vec<(&str, BytesMut)> = vec![
        ("empty", frame(&[])),
        ("unknown kind", frame(&[200])),
        ("truncated ack", frame(&[ACK, 0, 0, 0])),
        ("trailing bytes", frame(&[FLUSH, 0, 0, 0, 0, 0, 0, 0, 1, 9])),
        ("range past the end", {
            let mut body = vec![ZERO];
            body.extend_from_slice(&u64::MAX.to_be_bytes());
            body.extend_from_slice(&2u64.to_be_bytes());
            frame(&body)
        }),
        ("a welcome claiming more ranges than it holds", {
            let mut body = vec![WELCOME, 0, 1];
            body.extend_from_slice(&u32::MAX.to_be_bytes());
            frame(&body)
        }),
        ("an extent over the limit", {
            let mut body = vec![DATA];
            body.extend_from_slice(&0u64.to_be_bytes());
            body.extend_from_slice(&(MAX_EXTENT + 1).to_be_bytes());
            body.extend_from_slice(&[0; 33]);
            frame(&body)
        }),
        ("plain data of the wrong length", {
            let mut body = vec![DATA];
            body.extend_from_slice(&0u64.to_be_bytes());
            body.extend_from_slice(&10u32.to_be_bytes());
            body.extend_from_slice(&[0; 32]);
            body.push(0);
            body.extend_from_slice(&[1, 2, 3]);
            frame(&body)
        }),
        ("unknown compression", {
            let mut body = vec![DATA];
            body.extend_from_slice(&0u64.to_be_bytes());
            body.extend_from_slice(&0u32.to_be_bytes());
            body.extend_from_slice(&[0; 32]);
            body.push(9);
            frame(&body)
        }),
        ("stream out of range", {
            let mut body = vec![HELLO, 0, 1];
            body.extend_from_slice(&[0; 16]);
            body.extend_from_slice(&[0, 4, 0, 4]);
            body.extend_from_slice(&0u64.to_be_bytes());
            frame(&body)
        }),
        ("refusal not UTF-8", frame(&[REFUSED, 0, 1, 0, 2, 0xff, 0xfe])),
        ("unknown refusal code", frame(&[REFUSED, 0, 99, 0, 0])),
    ];
    for (what, mut buf) in cases {
        assert!(matches!(Codec.decode(&mut buf), Err(ProtoError::Malformed(_))), "{what}");
    }
}

#[test]
fn a_refusal_message_is_clipped_at_a_character_boundary() {
    let long = "é".repeat(MAX_MESSAGE);
    let m = Message::Refused(Refused { code: RefusalCode::Protocol, message: long });
    let Message::Refused(back) = decode_all(encode(&m)).unwrap().remove(0) else { panic!() };
    assert!(back.message.len() <= MAX_MESSAGE && back.message.chars().all(|c| c == 'é'));
}

#[test]
fn another_version_is_told_apart() {
    let hello = Hello { version: PROTOCOL_VERSION + 1, transfer: Uuid::nil(), stream: 0, streams: 1, disk_size: 1 };
    assert!(matches!(hello.check_version(), Err(ProtoError::Version(v)) if v == PROTOCOL_VERSION + 1));
    assert!(Hello { version: PROTOCOL_VERSION, ..hello }.check_version().is_ok());
}

#[tokio::test]
async fn messages_cross_a_connection_in_order() {
    use futures::{SinkExt, StreamExt};
    let (a, b) = tokio::io::duplex(64 * 1024);
    let mut tx = tokio_util::codec::Framed::new(a, Codec);
    let mut rx = tokio_util::codec::Framed::new(b, Codec);
    let sent = samples();
    let expected = sent.clone();
    let writer = tokio::spawn(async move {
        for m in sent {
            tx.send(m).await.unwrap();
        }
    });
    let mut got = Vec::new();
    while got.len() < expected.len() {
        got.push(rx.next().await.unwrap().unwrap());
    }
    writer.await.unwrap();
    assert_eq!(got, expected);
}

proptest! {
    #[test]
    fn data_round_trips(offset in 0u64..(1 << 40), bytes in proptest::collection::vec(any::<u8>(), 0..20_000), compress: bool) {
        let m = Message::Data(Data::new(offset, &bytes, compress));
        let back = decode_all(encode(&m)).unwrap();
        prop_assert_eq!(&back, &vec![m]);
        let Message::Data(d) = &back[0] else { unreachable!() };
        prop_assert_eq!(d.verified().unwrap(), bytes.as_slice());
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut buf = BytesMut::from(bytes.as_slice());
        // Errors are fine; a panic or an endless loop is not.
        for _ in 0..64 {
            match Codec.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }

    #[test]
    fn ranges_and_hashes_round_trip(ranges in proptest::collection::vec((0u64..(1 << 50), 0u64..(1 << 30)), 0..100),
                                   hashes in proptest::collection::vec(any::<[u8; 32]>(), 0..100)) {
        let acknowledged = ranges.iter().map(|&(offset, length)| Range { offset, length }).collect();
        let msgs = vec![
            Message::Welcome(Welcome { version: PROTOCOL_VERSION, acknowledged }),
            Message::Hashes { offset: 4096, block_size: 65536, hashes },
        ];
        let mut buf = BytesMut::new();
        for m in &msgs {
            Codec.encode(m.clone(), &mut buf).unwrap();
        }
        prop_assert_eq!(decode_all(buf).unwrap(), msgs);
    }
}

#[test]
fn a_data_frame_carries_a_hash_per_piece_and_a_wrong_count_is_malformed() {
    // 64 KiB + 1 byte: two pieces, the second one byte long.
    let plain: Vec<u8> = (0..HASH_PIECE + 1).map(|i| (i % 251) as u8).collect();
    let d = Data::new(1 << 20, &plain, false);
    let expected = [
        *blake3::hash(&plain[..HASH_PIECE as usize]).as_bytes(),
        *blake3::hash(&plain[HASH_PIECE as usize..]).as_bytes(),
    ];
    assert_eq!(d.hashes, expected);
    // Golden: length, kind, offset, length, the hashes, compression, payload.
    let frame = encode(&Message::Data(d.clone()));
    assert_eq!(frame.len(), 4 + 1 + 8 + 4 + 64 + 1 + plain.len());
    assert_eq!(&frame[17..49], &expected[0]);
    assert_eq!(&frame[49..81], &expected[1]);
    assert_eq!(frame[81], 0);
    assert_eq!(d.verified().unwrap(), plain);
    // A frame with one hash short is refused when sent and when checked.
    let short = Data { hashes: vec![expected[0]], ..d };
    assert!(matches!(Codec.encode(Message::Data(short.clone()), &mut BytesMut::new()), Err(ProtoError::Malformed(_))));
    assert!(matches!(short.verified(), Err(ProtoError::HashMismatch { .. })));
}

#[test]
fn a_survey_answer_is_granule_count_and_counts_within_its_limits() {
    // Golden: length, kind, granule, count, the counts.
    let mut golden = BytesMut::new();
    golden.put_u32(1 + 8 + 4 + 16);
    golden.put_u8(14);
    golden.put_u64(1 << 20);
    golden.put_u32(2);
    golden.put_u64(5 << 16);
    golden.put_u64(0);
    let m = Message::Surveyed { granule: 1 << 20, bytes: vec![5 << 16, 0] };
    assert_eq!(encode(&m), golden);
    assert_eq!(decode_all(golden).unwrap(), vec![m]);
    // A survey is a pull's fields under its own kind.
    let pull = a_pull(1 << 20, Range { offset: 0, length: 1 << 20 });
    let (p, s) = (encode(&Message::Pull(pull.clone())), encode(&Message::Survey(pull)));
    assert_eq!((p[4], s[4]), (11, 13));
    assert_eq!((&p[..4], &p[5..]), (&s[..4], &s[5..]));

    // Too many granules, granules of 0 bytes or not whole pieces: refused on both sides.
    for (granule, n) in [(65536, MAX_SURVEY + 1), (0, 1), (1000, 1)] {
        let m = Message::Surveyed { granule, bytes: vec![0; n] };
        assert!(matches!(Codec.encode(m, &mut BytesMut::new()), Err(ProtoError::Malformed(_))), "{granule} {n}");
        let mut frame = BytesMut::new();
        frame.put_u32((1 + 8 + 4 + 8 * n) as u32);
        frame.put_u8(14);
        frame.put_u64(granule);
        frame.put_u32(n as u32);
        frame.put_slice(&vec![0; 8 * n]);
        assert!(matches!(decode_all(frame), Err(ProtoError::Malformed(_))), "{granule} {n}");
    }
    // A count that claims more than the frame holds is refused before anything is allocated.
    let mut short = BytesMut::new();
    short.put_u32(1 + 8 + 4 + 8);
    short.put_u8(14);
    short.put_u64(65536);
    short.put_u32(4000);
    short.put_u64(1);
    assert!(matches!(decode_all(short), Err(ProtoError::Malformed(_))));
}
