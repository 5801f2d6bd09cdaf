/*
 * A thin adapter to simdjson for the function pool (functions_int.h): is
 * this text one valid JSON value? The pool forwards events (a measurement
 * of a few KB with its features, or a rule's transformed event) without
 * re-encoding them; jansson would build a tree of every value just to say
 * yes, which cost more than the call itself (docs/performance.md,
 * "Functions"). simdjson's DOM parser checks the whole document, UTF-8
 * included, in a few microseconds.
 */
#include "functions/functions_int.h"

#include <simdjson.h>

#include <cstring>

namespace {

struct scratch {
    simdjson::dom::parser parser;
    char *padded = nullptr;
    size_t cap = 0;
    ~scratch() { fm_free(padded); }
};

thread_local scratch tls;

} // namespace

extern "C" int fn__json_valid(const char *text, size_t len)
{
    scratch &s = tls;
    size_t need = len + simdjson::SIMDJSON_PADDING;
    if (need > s.cap) {
        char *p = static_cast<char *>(fm_malloc(need));
        if (!p)
            return FM_ENOMEM;
        fm_free(s.padded);
        s.padded = p;
        s.cap = need;
    }
    std::memcpy(s.padded, text, len);
    std::memset(s.padded + len, 0, simdjson::SIMDJSON_PADDING);
    simdjson::dom::element doc;
    auto rc = s.parser.parse(s.padded, len, false).get(doc);
    if (rc == simdjson::MEMALLOC)
        return FM_ENOMEM;
    return rc == simdjson::SUCCESS ? 1 : 0;
}
