#include "auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <cstring>
#include <stdexcept>

namespace tandem::auth {

Nonce nonce() {
  Nonce n{};
  if (RAND_bytes(n.data(), static_cast<int>(n.size())) != 1) throw std::runtime_error("no random bytes for a nonce");
  return n;
}

Proof proof(const std::vector<unsigned char>& key, const char* role, const Nonce& initiator, const Nonce& target) {
  std::string label = std::string("tandem-auth/1 ") + role + " ";
  std::vector<unsigned char> message(label.begin(), label.end());
  message.insert(message.end(), initiator.begin(), initiator.end());
  message.insert(message.end(), target.begin(), target.end());
  Proof out{};
  unsigned int length = 0;
  static const unsigned char kEmpty = 0;
  HMAC(EVP_sha256(), key.empty() ? &kEmpty : key.data(), static_cast<int>(key.size()), message.data(), message.size(),
       out.data(), &length);
  return out;
}

bool same(const Proof& a, const Proof& b) { return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0; }

}  // namespace tandem::auth
