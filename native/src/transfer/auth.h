// Mutual proof of a shared secret, for connections between Tandem processes (the transfer agents' hello
// today; the request and control planes can take the same construction: lib/transfer/auth.ts has it in
// TypeScript over node:crypto).
//
//   initiator -> target: nonceI (32 random bytes)
//   target -> initiator: nonceT, proof("target")      the target shows it holds the key
//   initiator -> target: proof("initiator")           the initiator shows it holds the key
//   proof(role) = HMAC-SHA256(key, "tandem-auth/1 " + role + " " + nonceI + nonceT)
// Each side checks the other's proof (constant time) over both fresh nonces before it trusts anything
// else on the connection; the role in the label keeps one side's proof from being reflected as the
// other's. It authenticates the peers; it does not encrypt the bytes that follow.
// HMAC, SHA-256 and the random bytes come from the OpenSSL that Node itself exports to addons.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace tandem::auth {

using Nonce = std::array<unsigned char, 32>;
using Proof = std::array<unsigned char, 32>;

// Fresh random bytes (OpenSSL RAND_bytes). Throws std::runtime_error when none can be had.
Nonce nonce();
// role: "initiator" or "target".
Proof proof(const std::vector<unsigned char>& key, const char* role, const Nonce& initiator, const Nonce& target);
bool same(const Proof& a, const Proof& b);  // constant time

}  // namespace tandem::auth
