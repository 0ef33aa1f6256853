package config

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// ErrBadSize is returned (wrapped) by ParseSize for any size it cannot read.
var ErrBadSize = errors.New("bad size")

// sizeUnits maps a unit suffix (lower case) to its multiplier. Single letters
// and the IEC forms are binary, as in qemu-img and most block tools; the SI
// forms ("kb", "mb", ...) are decimal.
var sizeUnits = map[string]int64{
	"": 1, "b": 1,
	"k": 1 << 10, "kib": 1 << 10, "kb": 1e3,
	"m": 1 << 20, "mib": 1 << 20, "mb": 1e6,
	"g": 1 << 30, "gib": 1 << 30, "gb": 1e9,
	"t": 1 << 40, "tib": 1 << 40, "tb": 1e12,
	"p": 1 << 50, "pib": 1 << 50, "pb": 1e15,
}

// ParseSize reads a byte count such as "10GiB", "512M", "4096", "1.5G" or
// "10 GB". Single-letter and IEC units are powers of 1024; KB, MB, GB, TB, PB
// are powers of 1000. The result must be a positive whole number of bytes.
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return 0, fmt.Errorf("%w: empty", ErrBadSize)
	}
	i := 0
	for i < len(t) && (t[i] >= '0' && t[i] <= '9' || t[i] == '.') {
		i++
	}
	num, unit := t[:i], strings.ToLower(strings.TrimSpace(t[i:]))
	if num == "" {
		return 0, fmt.Errorf("%w: %q has no number", ErrBadSize, s)
	}
	mult, ok := sizeUnits[unit]
	if !ok {
		return 0, fmt.Errorf("%w: %q has unknown unit %q (use B, KiB, MiB, GiB, TiB, K, M, G, T, KB, MB, GB, TB)", ErrBadSize, s, t[i:])
	}
	if !strings.Contains(num, ".") {
		n, err := strconv.ParseInt(num, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%w: %q: %v", ErrBadSize, s, err)
		}
		if n <= 0 {
			return 0, fmt.Errorf("%w: %q must be positive", ErrBadSize, s)
		}
		if n > math.MaxInt64/mult {
			return 0, fmt.Errorf("%w: %q is too large", ErrBadSize, s)
		}
		return n * mult, nil
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: %q: %v", ErrBadSize, s, err)
	}
	v := f * float64(mult)
	if v <= 0 || v >= math.MaxInt64/2 {
		return 0, fmt.Errorf("%w: %q is out of range", ErrBadSize, s)
	}
	if v != math.Trunc(v) {
		return 0, fmt.Errorf("%w: %q is not a whole number of bytes", ErrBadSize, s)
	}
	return int64(v), nil
}

// FormatSize renders n bytes in the largest binary unit that divides it
// exactly, so that ParseSize(FormatSize(n)) == n.
func FormatSize(n int64) string {
	units := []struct {
		name string
		mult int64
	}{{"PiB", 1 << 50}, {"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}}
	for _, u := range units {
		if n >= u.mult && n%u.mult == 0 {
			return strconv.FormatInt(n/u.mult, 10) + u.name
		}
	}
	return strconv.FormatInt(n, 10) + "B"
}
