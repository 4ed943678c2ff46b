// Host test of csrc/margin_math.h (no GPU): hand-derived values, then a dump for the Python cross-check.
//   g++ -std=c++17 -O2 -I csrc csrc/tests/test_margin_math.cpp -o test_margin_math && ./test_margin_math
//   ./test_margin_math dump   # c m1 m2 m3 fallback st z slope, one case per line
#include <cmath>
#include <cstdio>
#include <cstring>

#include "margin_math.h"

static int passed = 0, failed = 0;

static void check(bool ok, const char* what, double got, double want) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAIL %s: got %.17g, want %.17g\n", what, got, want);
  }
}

static void near(const char* what, double got, double want, double tol = 1e-12) {
  check(std::fabs(got - want) <= tol * (1.0 + std::fabs(want)), what, got, want);
}

int main(int argc, char** argv) {
  const double s = 64.0;
  if (argc > 1 && std::strcmp(argv[1], "dump") == 0) {
    const double cs[] = {-1.0, -0.999, -0.9, -0.5, -0.1, 0.0, 0.3, 0.7, 0.95, 0.9999999, 1.0};
    const double margins[][3] = {{1, 0.5, 0}, {1, 0, 0.35}, {1.35, 0, 0}, {1, 0.3, 0.2}, {2, 0.1, 0.05}};
    for (const auto& mg : margins)
      for (double c : cs)
        for (int fb = 0; fb < 2; ++fb)
          for (int st = 0; st < 2; ++st) {
            double z, d;
            mdk::margin_target(c, s, mg[0], mg[1], mg[2], fb != 0, st != 0, &z, &d);
            std::printf("%.17g %.17g %.17g %.17g %d %d %.17g %.17g\n", c, mg[0], mg[1], mg[2], fb, st, z, d);
          }
    return 0;
  }
  // ArcFace at theta = 60 degrees: z = s*cos(pi/3 + 0.5), dz/dc = s*sin(pi/3 + 0.5)/sin(pi/3)
  double z, d;
  const double c = 0.5, th = std::acos(0.5);
  mdk::margin_target(c, s, 1.0, 0.5, 0.0, true, false, &z, &d);
  near("arcface z", z, s * std::cos(th + 0.5));
  near("arcface slope", d, s * std::sin(th + 0.5) / std::sin(th));
  mdk::margin_target(c, s, 1.0, 0.5, 0.0, true, true, &z, &d);
  near("straight-through slope", d, s);
  // CosFace: z = s*(c - m3), slope s
  mdk::margin_target(0.2, s, 1.0, 0.0, 0.35, true, false, &z, &d);
  near("cosface z", z, s * (0.2 - 0.35));
  near("cosface slope", d, s, 1e-9);
  // fallback branch: theta + m2 > pi
  const double cf = std::cos(mdk::kPi * 170.0 / 180.0);
  mdk::margin_target(cf, s, 1.0, 0.5, 0.0, true, false, &z, &d);
  near("fallback z", z, s * (cf - 0.5 * std::sin(0.5)));
  near("fallback slope", d, s);
  mdk::margin_target(cf, s, 1.0, 0.5, 0.0, false, false, &z, &d);
  near("literal z (no fallback)", z, s * std::cos(std::acos(cf) + 0.5));
  // SphereFace m1 = 2: z = s*cos(2 theta) = s*(2c^2 - 1), slope = s*4c
  mdk::margin_target(0.3, s, 2.0, 0.0, 0.0, true, false, &z, &d);
  near("sphereface z", z, s * (2 * 0.09 - 1));
  near("sphereface slope", d, s * 4 * 0.3, 1e-9);
  // theta near 0: the derivative is finite (theta clamped)
  mdk::margin_target(1.0, s, 1.0, 0.5, 0.0, true, false, &z, &d);
  check(std::isfinite(d), "slope at c = 1 is finite", d, 0);
  // online logsumexp: push and merge agree with the direct formula
  const double zs[] = {3.0, -1.0, 10.0, 9.5, -40.0, 0.0};
  mdk::LseState<double> all = mdk::LseState<double>::empty(), a = all, b = all;
  double direct = 0;
  for (int i = 0; i < 6; ++i) {
    all.push(zs[i]);
    (i < 3 ? a : b).push(zs[i]);
    direct += std::exp(zs[i] - 10.0);
  }
  a.merge(b);
  near("lse push", all.value(), 10.0 + std::log(direct));
  near("lse merge", a.value(), 10.0 + std::log(direct));
  mdk::LseState<double> none = mdk::LseState<double>::empty(), other = mdk::LseState<double>::empty();
  none.merge(other);
  check(std::isinf(none.value()) && none.value() < 0, "empty lse is -inf", none.value(), -INFINITY);
  mdk::LseState<float> f = mdk::LseState<float>::empty();
  f.push(80.0f);
  f.push(80.0f);
  near("fp32 lse without overflow", f.value(), 80.0 + std::log(2.0), 1e-6);
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
