from app.backends.llama.stop_text import StopText


def feed_all(stops: tuple[str, ...], pieces: list[bytes]) -> tuple[str, bool]:
    text = StopText(stops)
    out = []
    for piece in pieces:
        delta, stopped = text.feed(piece)
        out.append(delta)
        if stopped:
            return "".join(out), True
    out.append(text.flush())
    return "".join(out), False


def test_no_stops_passes_everything_through() -> None:
    assert feed_all((), [b"Hello", b" world"]) == ("Hello world", False)


def test_stop_string_split_across_pieces_is_never_sent() -> None:
    assert feed_all(("END",), [b"abc E", b"N", b"D tail"]) == ("abc ", True)


def test_a_near_miss_is_released() -> None:
    text = StopText(("END",))
    assert text.feed(b"abc EN") == ("abc ", False)  # "EN" could still become "END"
    assert text.feed(b"X") == ("ENX", False)


def test_held_text_comes_out_when_generation_ends() -> None:
    assert feed_all(("###",), [b"a #", b"#"]) == ("a ##", False)


def test_earliest_of_several_stops_wins() -> None:
    assert feed_all(("b", "cd"), [b"a", b"cdb"]) == ("a", True)


def test_multibyte_characters_split_across_tokens() -> None:
    euro = "€".encode()
    text = StopText(())
    assert text.feed(euro[:1]) == ("", False)
    assert text.feed(euro[1:]) == ("€", False)
