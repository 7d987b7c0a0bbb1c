#include "store/history.h"

#include <catch2/catch.hpp>

namespace vmetafs::store {
namespace {

constexpr int64_t kS = 1000000000;

PointInTime Parse(const std::string& text) {
  PointInTime p;
  Status s = ParsePointInTime(text, &p);
  INFO(text << ": " << s.ToString());
  REQUIRE(s.ok());
  return p;
}

TEST_CASE("points in time: sequence numbers", "[history]") {
  CHECK(Parse("42").kind == PointInTime::Kind::kSeq);
  CHECK(Parse("42").seq == 42);
  CHECK(Parse("999999999").seq == 999999999);
  const PointInTime big = Parse("seq:2000000000");
  CHECK(big.kind == PointInTime::Kind::kSeq);
  CHECK(big.seq == 2000000000);
}

TEST_CASE("points in time: unix seconds and ISO 8601", "[history]") {
  const int64_t t = 1700000000 * kS;  // 2023-11-14T22:13:20Z
  for (const char* text : {"1700000000", "@1700000000", "2023-11-14T22:13:20Z",
                           "2023-11-14T22:13:20", "2023-11-14 22:13:20", "2023-11-14t22:13:20z",
                           "2023-11-14T23:13:20+01:00", "2023-11-14T20:43:20-0130"}) {
    const PointInTime p = Parse(text);
    INFO(text);
    CHECK(p.kind == PointInTime::Kind::kTime);
    CHECK(p.time_ns == t);
  }
  CHECK(Parse("@1700000000.25").time_ns == t + kS / 4);
  CHECK(Parse("2023-11-14T22:13:20.250Z").time_ns == t + kS / 4);
  CHECK(Parse("2023-11-14T22:13Z").time_ns == t - 20 * kS);
  CHECK(Parse("2023-11-14").time_ns == t - (22 * 3600 + 13 * 60 + 20) * kS);
  CHECK(Parse("@12").time_ns == 12 * kS);
  CHECK(IsoTimeUtc(t + kS / 4) == "2023-11-14T22:13:20.250Z");
  CHECK(Parse(IsoTimeUtc(t + kS / 4)).time_ns == t + kS / 4);
  CHECK(Parse("@1700000000").ToString() == "2023-11-14T22:13:20.000Z");
  CHECK(Parse("7").ToString() == "seq 7");
}

TEST_CASE("points in time: nonsense is refused", "[history]") {
  for (const char* text : {"", "yesterday", "seq:", "seq:x", "@", "@x", "12.5", "2023-13-01",
                           "2023-11-14T25:00:00Z", "2023-11-14T22:13:20+1", "2023-11-14T22",
                           "2023-11-14T22:13:20Zjunk", "-5"}) {
    PointInTime p;
    INFO(text);
    CHECK(ParsePointInTime(text, &p).code() == Status::Code::kInvalidArgument);
  }
}

}  // namespace
}  // namespace vmetafs::store
