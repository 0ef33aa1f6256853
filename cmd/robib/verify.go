package main

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"

	"github.com/spf13/cobra"

	"github.com/robib/robib/cluster"
	"github.com/robib/robib/cmd/internal/api"
	"github.com/robib/robib/cmd/internal/config"
)

// scan is what verify and repair share before they walk a volume: the
// chunk and range sizes, the API client, the volume, and where the report
// and the progress lines go.
type scan struct {
	chunk, step   int64
	client        *api.Client
	vol           api.Volume
	out, progress io.Writer
}

// newScan parses --chunk-size and --range-size (a chunk a multiple of
// align, if align > 0; a range a multiple of the chunk, at most one
// replicated verify step) and looks the volume up; silent sends no
// progress.
func newScan(cmd *cobra.Command, g *globals, name, chunk, rangeSize string, align int64, silent bool) (scan, error) {
	var s scan
	var err error
	if s.chunk, err = config.ParseSize(chunk); err != nil {
		return s, fmt.Errorf("--chunk-size: %w", err)
	}
	if s.step, err = config.ParseSize(rangeSize); err != nil {
		return s, fmt.Errorf("--range-size: %w", err)
	}
	if align > 0 && (s.chunk < align || s.chunk%align != 0) {
		return s, usageError("--chunk-size must be a multiple of %s", config.FormatSize(align))
	}
	if s.step > cluster.MaxVerifyRange || s.step < s.chunk || s.step%s.chunk != 0 {
		return s, usageError("--range-size must be a multiple of --chunk-size and at most %s", config.FormatSize(cluster.MaxVerifyRange))
	}
	if s.client, err = g.client(); err != nil {
		return s, err
	}
	if s.vol, err = s.client.GetVolume(cmd.Context(), name); err != nil {
		return s, err
	}
	s.out, s.progress = cmd.OutOrStdout(), cmd.ErrOrStderr()
	if silent {
		s.progress = io.Discard
	}
	return s, nil
}

// errVerifyFailed makes `volume verify` exit non-zero after its report.
var errVerifyFailed = errors.New("verify failed")

func newVolumeVerifyCmd(g *globals) *cobra.Command {
	var chunk, rangeSize string
	var asJSON, quiet bool
	cmd := &cobra.Command{
		Use:   "verify NAME",
		Short: "Compare every site's copy of a volume, chunk by chunk, at the same log index",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := newScan(cmd, g, args[0], chunk, rangeSize, 0, quiet || asJSON)
			if err != nil {
				return err
			}
			chunkSize, step, c, v, out, progress := s.chunk, s.step, s.client, s.vol, s.out, s.progress
			sum := verifySummary{Volume: v.Name, Size: v.Size, ChunkSize: chunkSize, Unreachable: map[string]string{}}
			sites := map[string]bool{}
			for off := int64(0); off < v.Size; off += step {
				n := min(step, v.Size-off)
				res, err := c.VerifyVolume(cmd.Context(), v.Name, api.VerifyRequest{Offset: off, Length: n, ChunkSize: chunkSize})
				if err != nil {
					return err
				}
				sum.Chunks += res.Chunks
				sum.Mismatches = append(sum.Mismatches, res.Mismatches...)
				for _, s := range res.Sites {
					sites[s] = true
				}
				for s, why := range res.Unreachable {
					sum.Unreachable[s] = why
				}
				fmt.Fprintf(progress, "\rverify %s: %5.1f%% (%s of %s, index %d, %d mismatching chunks)",
					v.Name, 100*float64(off+n)/float64(v.Size), config.FormatSize(off+n), config.FormatSize(v.Size), res.Index, len(sum.Mismatches))
			}
			fmt.Fprintln(progress)
			for s := range sites {
				sum.Sites = append(sum.Sites, s)
			}
			sort.Strings(sum.Sites)
			for s := range sum.Unreachable {
				if slices.Contains(sum.Sites, s) {
					delete(sum.Unreachable, s) // answered for some ranges only: still a failure below
					sum.Partial = append(sum.Partial, s)
				}
			}
			sum.OK = len(sum.Mismatches) == 0 && len(sum.Unreachable) == 0 && len(sum.Partial) == 0
			return report(out, asJSON, sum, sum.OK, errVerifyFailed)
		},
	}
	cmd.Flags().StringVar(&chunk, "chunk-size", "1MiB", "size of each compared chunk")
	cmd.Flags().StringVar(&rangeSize, "range-size", "64MiB", "bytes hashed per replicated verify step")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "no progress output")
	return cmd
}

type verifySummary struct {
	Volume      string                    `json:"volume"`
	Size        int64                     `json:"size"`
	ChunkSize   int64                     `json:"chunk_size"`
	Chunks      int                       `json:"chunks"`
	Sites       []string                  `json:"sites"`
	Unreachable map[string]string         `json:"unreachable,omitempty"`
	Partial     []string                  `json:"partial,omitempty"`
	Mismatches  []cluster.VerifyChunkDiff `json:"mismatches,omitempty"`
	OK          bool                      `json:"ok"`
}

func (s verifySummary) print(w io.Writer) {
	fmt.Fprintf(w, "volume %s: %d chunks of %s compared across %d sites %v\n", s.Volume, s.Chunks, config.FormatSize(s.ChunkSize), len(s.Sites), s.Sites)
	for site, why := range s.Unreachable {
		fmt.Fprintf(w, "  site %s not compared: %s\n", site, why)
	}
	for _, site := range s.Partial {
		fmt.Fprintf(w, "  site %s answered only part of the verify\n", site)
	}
	for _, m := range s.Mismatches {
		fmt.Fprintf(w, "  MISMATCH at offset %d (+%d):", m.Offset, m.Length)
		sites := make([]string, 0, len(m.Hashes))
		for site := range m.Hashes {
			sites = append(sites, site)
		}
		sort.Strings(sites)
		for _, site := range sites {
			h := m.Hashes[site]
			if len(h) > 12 {
				h = h[:12]
			}
			fmt.Fprintf(w, " %s=%s", site, h)
		}
		fmt.Fprintln(w)
	}
	if s.OK {
		fmt.Fprintln(w, "all copies identical")
	} else {
		fmt.Fprintf(w, "copies differ or could not all be compared: %d mismatching chunks\n", len(s.Mismatches))
	}
}
