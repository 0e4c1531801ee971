"""E-mail normalization, hashing and masking; codes, HMACs, identifiers and tokens."""

from __future__ import annotations

import base64
import hashlib
import re
import unicodedata
from collections import Counter

import pytest

from authsession.domain import codes
from authsession.domain.email import MAX_EMAIL_LENGTH, email_hash, mask_email, normalize_email
from authsession.domain.errors import InvalidRequest

URL_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


# =========================================================================== normalization
@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("jane@example.com", "jane@example.com"),
        ("  jane@example.com\t\n", "jane@example.com"),
        ("\u00a0jane@example.com\u2003", "jane@example.com"),  # Unicode spaces are trimmed
        ("JANE@EXAMPLE.COM", "jane@example.com"),
        ("Jane.Doe+Tag@Example.Com", "jane.doe+tag@example.com"),
        ("anna@bücher.de", "anna@xn--bcher-kva.de"),
        ("Anna@BÜCHER.DE", "anna@xn--bcher-kva.de"),
        ("anna@xn--bcher-kva.de", "anna@xn--bcher-kva.de"),
        ("jane@exämple.com", "jane@xn--exmple-cua.com"),
        ("josé@example.com", "josé@example.com"),
    ],
)
def test_normalization(raw: str, normalized: str) -> None:
    assert normalize_email(raw) == normalized


def test_nfc_and_nfd_inputs_normalize_alike() -> None:
    nfc = unicodedata.normalize("NFC", "José@Bücher.de")
    nfd = unicodedata.normalize("NFD", "José@Bücher.de")
    assert nfc != nfd
    result = normalize_email(nfd)
    assert result == normalize_email(nfc) == "josé@xn--bcher-kva.de"
    assert unicodedata.is_normalized("NFC", result)
    assert email_hash(normalize_email(nfd)) == email_hash(normalize_email(nfc))


def test_normalization_is_idempotent() -> None:
    for raw in ("  Anna@BÜCHER.de ", "JOSE\u0301@example.com", "x@EXAMPLE.org"):
        once = normalize_email(raw)
        assert normalize_email(once) == once


def _domain_of_length(length: int) -> str:
    """A valid ASCII domain of exactly ``length`` characters (labels ≤ 63)."""
    labels = []
    left = length - len(".com")
    while left > 0:
        size = min(63, left if left <= 63 else min(63, left - 2))
        labels.append("d" * size)
        left -= size + 1
    domain = ".".join(labels) + ".com"
    assert len(domain) == length, (len(domain), length)
    return domain


def test_an_address_of_254_characters_is_accepted() -> None:
    address = "a" * 64 + "@" + _domain_of_length(MAX_EMAIL_LENGTH - 65)
    assert len(address) == 254
    assert normalize_email(address) == address
    assert normalize_email(address.upper()) == address


def test_an_address_of_255_characters_is_rejected() -> None:
    address = "a" * 64 + "@" + _domain_of_length(MAX_EMAIL_LENGTH - 64)
    assert len(address) == 255
    with pytest.raises(InvalidRequest):
        normalize_email(address)


def test_the_limit_applies_after_trimming() -> None:
    address = "a" * 64 + "@" + _domain_of_length(MAX_EMAIL_LENGTH - 65)
    assert normalize_email(f"   {address}   ") == address


def test_the_limit_applies_to_the_idna_form() -> None:
    # 250 characters as typed, more than 254 once the domain is punycode.
    domain = "ü" * 20 + "." + _domain_of_length(250 - 64 - 1 - 21)
    address = "a" * 64 + "@" + domain
    assert len(address) == 250
    assert len("a" * 64 + "@" + domain.encode("idna").decode()) > 254
    with pytest.raises(InvalidRequest):
        normalize_email(address)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "jane",
        "jane.example.com",
        "@example.com",
        "jane@",
        "jane@@example.com",
        "jane doe@example.com",
        "jane@exa mple.com",
        "jane@-example.com",
        "jane@example..com",
        "jane@.example.com",
        "jane@example.com.",
        "jane@localhost",
        "jane@[127.0.0.1]",
        "jane@exam_ple.com",
        ".jane@example.com",
        "jane.@example.com",
        "ja..ne@example.com",
        "ja\u00a0ne@example.com",
        "jane@example.com\x00",
        "<jane@example.com>",
        "Jane <jane@example.com>",
        "jane@example.123",
        '"jane doe"@example.com',
    ],
)
def test_invalid_forms_are_rejected(raw: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        normalize_email(raw)
    assert caught.value.code == "invalid_request"
    assert caught.value.details == {"field": "email"}


# =========================================================================== hashing, masking
def test_email_hash_is_hex_sha256_of_the_normalized_address() -> None:
    digest = email_hash("jane@example.com")
    assert digest == hashlib.sha256(b"jane@example.com").hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert email_hash(normalize_email("  JANE@example.COM ")) == digest
    assert email_hash("john@example.com") != digest


def test_email_hash_of_a_non_ascii_address_hashes_its_utf8() -> None:
    assert email_hash("josé@example.com") == hashlib.sha256("josé@example.com".encode()).hexdigest()


@pytest.mark.parametrize(
    ("address", "masked"),
    [
        ("jane@example.com", "j***@example.com"),
        ("j@example.com", "j***@example.com"),
        ("josé@xn--bcher-kva.de", "j***@xn--bcher-kva.de"),
        ("odd@local@example.com", "o***@example.com"),
        ("no-at-sign", "***"),
        ("", "***"),
    ],
)
def test_mask_email(address: str, masked: str) -> None:
    assert mask_email(address) == masked


def test_a_masked_address_never_contains_the_local_part() -> None:
    assert "jane.doe" not in mask_email("jane.doe@example.com")


# =========================================================================== codes
def test_codes_are_six_ascii_digits() -> None:
    for _ in range(2000):
        code = codes.generate_code()
        assert len(code) == 6
        assert code.isascii()
        assert re.fullmatch(r"[0-9]{6}", code)
        assert re.fullmatch(codes.CODE_PATTERN, code)


def test_codes_are_spread_over_all_digits_and_positions() -> None:
    draws = 20_000
    sample = [codes.generate_code() for _ in range(draws)]
    for position in range(6):
        counts = Counter(code[position] for code in sample)
        assert set(counts) == set("0123456789")
        # Expected 2000 each, standard deviation ~42: ±400 is far outside chance.
        assert all(1600 <= n <= 2400 for n in counts.values()), (position, counts)
    # Leading zeros are kept (no int formatting loss) and codes rarely repeat.
    assert any(code.startswith("0") for code in sample)
    assert len(set(sample)) > draws * 0.97
    # Roughly uniform over the whole range, not only per digit.
    halves = Counter(int(code) < 500_000 for code in sample)
    assert abs(halves[True] - halves[False]) < 1000


def test_code_hmac_is_salted() -> None:
    salt_a, salt_b = codes.new_salt(), codes.new_salt()
    assert salt_a != salt_b
    digest_a = codes.code_hmac(salt_a, "123456")
    assert digest_a == codes.code_hmac(salt_a, "123456")
    assert digest_a != codes.code_hmac(salt_b, "123456")
    assert digest_a != codes.code_hmac(salt_a, "123457")
    assert re.fullmatch(r"[0-9a-f]{64}", digest_a)
    assert "123456" not in digest_a


def test_code_hmac_is_hmac_sha256_keyed_by_the_salt() -> None:
    import hmac

    salt = "00112233445566778899aabbccddeeff"
    expected = hmac.new(bytes.fromhex(salt), b"042042", hashlib.sha256).hexdigest()
    assert codes.code_hmac(salt, "042042") == expected


def test_salts_have_128_bits() -> None:
    salts = {codes.new_salt() for _ in range(500)}
    assert len(salts) == 500
    for salt in salts:
        assert re.fullmatch(r"[0-9a-f]{32}", salt)
        assert len(bytes.fromhex(salt)) * 8 == 128


def test_code_hmac_depends_on_the_code_and_the_salt() -> None:
    # The comparison itself happens in challenge_attempt.lua, on these digests.
    salt = codes.new_salt()
    stored = codes.code_hmac(salt, "123456")
    assert re.fullmatch(r"[0-9a-f]{64}", stored)
    assert codes.code_hmac(salt, "123456") == stored
    assert codes.code_hmac(salt, "123457") != stored
    assert codes.code_hmac(salt, "654321") != stored
    assert codes.code_hmac(codes.new_salt(), "123456") != stored


# =========================================================================== identifiers
def test_ids_are_url_safe_of_contract_length_with_at_least_128_bits() -> None:
    sample = [codes.new_id() for _ in range(2000)]
    assert len(set(sample)) == len(sample)
    for value in sample:
        assert URL_SAFE_ID.fullmatch(value)
        assert codes.is_valid_id(value)
        # Each URL-safe base64 character carries 6 bits.
        assert len(value) * 6 >= 128
        assert len(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))) * 8 >= 128


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("a" * 16, True),
        ("A-b_" * 16, True),
        ("a" * 15, False),
        ("a" * 65, False),
        ("a" * 31 + "=", False),
        ("a" * 31 + "/", False),
        ("a" * 31 + "+", False),
        ("a" * 31 + ".", False),
        ("a" * 31 + "é", False),
        ("", False),
    ],
)
def test_is_valid_id(value: str, valid: bool) -> None:
    assert codes.is_valid_id(value) is valid


def test_an_id_with_a_trailing_newline_is_not_valid() -> None:
    assert codes.is_valid_id("a" * 31 + "\n") is False


def test_session_tokens_are_the_id_a_dot_and_a_256_bit_secret() -> None:
    device_session_id = codes.new_id()
    tokens = {codes.new_session_token(device_session_id) for _ in range(500)}
    assert len(tokens) == 500
    for token in tokens:
        head, dot, secret = token.rpartition(".")
        assert (head, dot) == (device_session_id, ".")
        assert re.fullmatch(r"[A-Za-z0-9_-]+", secret)
        raw = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
        assert len(raw) * 8 >= 256


def test_token_sha256_hashes_the_whole_token() -> None:
    token = codes.new_session_token(codes.new_id())
    digest = codes.token_sha256(token)
    assert digest == hashlib.sha256(token.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    _, _, secret = token.rpartition(".")
    assert digest != hashlib.sha256(secret.encode()).hexdigest()
    assert codes.token_sha256(token + "x") != digest
