"""MLLP framing: every split of the byte stream yields the same messages, junk is reported."""

from __future__ import annotations

import random

import pytest

from reports.mllp import Discarded, Frame, FrameDecoder, frame

MESSAGES = [
    b"MSH|^~\\&|RIS|H1|RF|RF|20260101||ORU^R01|1|P|2.5.1\rPID|1\r",
    b"MSH|^~\\&|RIS|H1|RF|RF|20260101||ADT^A01|2|P|2.3\r",
    b"",  # an empty frame is still a frame (the receiver answers it with AE)
    bytes(range(0x20, 0x7F)) * 50,
]


def frames_of(items: list[Frame | Discarded]) -> list[bytes]:
    return [item.data for item in items if isinstance(item, Frame)]


def test_frame_wraps_and_refuses_framing_bytes() -> None:
    assert frame(b"MSH|x") == b"\x0bMSH|x\x1c\r"
    with pytest.raises(ValueError, match="start or end block"):
        frame(b"MSH|\x1c")


def test_every_chunking_of_the_stream_gives_the_same_frames() -> None:
    stream = b"".join(frame(m) for m in MESSAGES)
    rng = random.Random(7)
    for trial in range(200):
        decoder = FrameDecoder()
        out: list[Frame | Discarded] = []
        i = 0
        while i < len(stream):
            step = 1 if trial == 0 else rng.randint(1, 64)
            out += decoder.feed(stream[i : i + step])
            i += step
        assert frames_of(out) == MESSAGES
        assert not [x for x in out if isinstance(x, Discarded)]
        assert decoder.buffered == 0


def test_junk_between_frames_is_reported_not_delivered() -> None:
    decoder = FrameDecoder()
    stream = b"\r\n" + frame(MESSAGES[0]) + b"\x00\x00garbage\n" + frame(MESSAGES[1]) + b"\r\n"
    out = decoder.feed(stream) + decoder.close()
    assert frames_of(out) == MESSAGES[:2]
    junk = [x for x in out if isinstance(x, Discarded)]
    assert [(j.reason, j.size, j.head) for j in junk] == [
        ("bytes outside any frame", 2, b"\r\n"),
        ("bytes outside any frame", 10, b"\x00\x00garbage\n"),
        ("bytes outside any frame", 2, b"\r\n"),
    ]


def test_restart_inside_a_frame_discards_the_unfinished_message() -> None:
    decoder = FrameDecoder()
    out = decoder.feed(b"\x0bMSH|half a mess" + frame(MESSAGES[1]))
    assert isinstance(out[0], Discarded)
    assert out[0].reason == "frame interrupted by a new start block"
    assert out[0].head == b"MSH|half a mess"
    assert frames_of(out) == [MESSAGES[1]]


def test_end_block_without_carriage_return_still_ends_the_frame() -> None:
    decoder = FrameDecoder()
    out = decoder.feed(b"\x0bMSH|a\x1c")  # the decision waits for the next byte
    assert out == []
    out = decoder.feed(b"\x0bMSH|b\x1c\r")
    assert frames_of(out) == [b"MSH|a", b"MSH|b"]
    assert frames_of(decoder.feed(b"\x0bMSH|c\x1c") + decoder.close()) == [b"MSH|c"]


def test_stream_ending_inside_a_frame_is_reported() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x0bMSH|never finished") == []
    assert decoder.buffered == len(b"MSH|never finished")
    out = decoder.close()
    assert out == [Discarded("stream ended inside a frame", 18, b"MSH|never finished")]


def test_oversized_frame_is_skipped_and_the_next_one_delivered() -> None:
    decoder = FrameDecoder(max_frame=100)
    big = b"MSH|^~\\&|RIS|H1|||||ORU^R01|9|P|2.5.1\r" + b"X" * 500
    out: list[Frame | Discarded] = []
    for i in range(0, len(frame(big)), 37):  # split across many reads
        out += decoder.feed(frame(big)[i : i + 37])
    out += decoder.feed(frame(MESSAGES[1]))
    assert isinstance(out[0], Discarded)
    assert out[0].reason == "frame of 538 bytes exceeds the limit of 100"
    assert out[0].size == len(big)
    assert out[0].head.startswith(b"MSH|^~\\&|RIS|H1")  # kept for the ACK and quarantine
    assert frames_of(out) == [MESSAGES[1]]
    assert decoder.buffered == 0
