package main

import (
	"errors"
	"fmt"
	"io"
	"sort"

	"github.com/spf13/cobra"

	"github.com/robib/robib/cluster"
	"github.com/robib/robib/cmd/internal/api"
	"github.com/robib/robib/cmd/internal/config"
)

// errRepairIncomplete makes `volume repair` exit non-zero after its
// report: chunks without a majority, failed repairs, or copies that still
// differ.
var errRepairIncomplete = errors.New("repair incomplete")

func newVolumeRepairCmd(g *globals) *cobra.Command {
	var chunk, rangeSize, site string
	var asJSON, quiet bool
	cmd := &cobra.Command{
		Use:   "repair NAME [--site SITE]",
		Short: "Verify a volume and repair every chunk where a minority of sites differs from a strict majority",
		Long: `Verifies the volume range by range (as volume verify) and, for every chunk
whose copies differ, finds the hash held by a strict majority of the voters
(sites that do not answer count as voters without it). Every other site
(only --site, if given) marks the chunk damaged and repairs it from the
majority sites only; a chunk with no strict majority is reported and left
alone. Prints every change (site, offset, length) and a summary; exits
non-zero when something could not be repaired or still differs.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := newScan(cmd, g, args[0], chunk, rangeSize, cluster.RepairBlock, quiet || asJSON)
			if err != nil {
				return err
			}
			chunkSize, step, c, v, out, progress := s.chunk, s.step, s.client, s.vol, s.out, s.progress
			sum := repairSummary{Volume: v.Name, Size: v.Size, ChunkSize: chunkSize, Site: site, Unreachable: map[string]string{}}
			sites := map[string]bool{}
			for off := int64(0); off < v.Size; off += step {
				n := min(step, v.Size-off)
				res, err := c.RepairVolume(cmd.Context(), v.Name, api.RepairRequest{Offset: off, Length: n, ChunkSize: chunkSize, Site: site})
				if err != nil {
					return err
				}
				sum.add(res)
				for _, s := range res.Sites {
					sites[s] = true
				}
				fmt.Fprintf(progress, "\rrepair %s: %5.1f%% (%s of %s, %d repaired, %d without majority)",
					v.Name, 100*float64(off+n)/float64(v.Size), config.FormatSize(off+n), config.FormatSize(v.Size), len(sum.Repairs), len(sum.NoMajority))
			}
			fmt.Fprintln(progress)
			for s := range sites {
				sum.Sites = append(sum.Sites, s)
			}
			sort.Strings(sum.Sites)
			sum.OK = len(sum.NoMajority) == 0 && sum.Failed == 0 && len(sum.Remaining) == 0 && len(sum.RecheckErrors) == 0
			return report(out, asJSON, sum, sum.OK, errRepairIncomplete)
		},
	}
	cmd.Flags().StringVar(&site, "site", "", "repair only this site's copy")
	cmd.Flags().StringVar(&chunk, "chunk-size", "1MiB", "size of each compared (and repaired) chunk, a multiple of 4KiB")
	cmd.Flags().StringVar(&rangeSize, "range-size", "64MiB", "bytes verified per replicated verify step")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "no progress output")
	return cmd
}

// repairSummary is what `volume repair` did to the whole volume.
type repairSummary struct {
	Volume        string                    `json:"volume"`
	Size          int64                     `json:"size"`
	ChunkSize     int64                     `json:"chunk_size"`
	Site          string                    `json:"site,omitempty"` // --site
	Chunks        int                       `json:"chunks"`
	Sites         []string                  `json:"sites"`
	Unreachable   map[string]string         `json:"unreachable,omitempty"`
	Repairs       []cluster.ChunkRepair     `json:"repairs,omitempty"`
	RepairedBytes int64                     `json:"repaired_bytes"`
	Failed        int                       `json:"failed"` // repairs that reported an error
	NoMajority    []cluster.VerifyChunkDiff `json:"no_majority,omitempty"`
	Remaining     []cluster.VerifyChunkDiff `json:"remaining,omitempty"`
	RecheckErrors []string                  `json:"recheck_errors,omitempty"`
	OK            bool                      `json:"ok"`
}

func (s *repairSummary) add(res cluster.RepairResult) {
	s.Chunks += res.Chunks
	for site, why := range res.Unreachable {
		s.Unreachable[site] = why
	}
	for _, r := range res.Repairs {
		s.Repairs = append(s.Repairs, r)
		s.RepairedBytes += r.RepairedBytes
		if r.Error != "" {
			s.Failed++
		}
	}
	s.NoMajority = append(s.NoMajority, res.NoMajority...)
	s.Remaining = append(s.Remaining, res.Remaining...)
	if res.RecheckError != "" {
		s.RecheckErrors = append(s.RecheckErrors, fmt.Sprintf("[%d, +%d): %s", res.Offset, res.Length, res.RecheckError))
	}
}

func printRepair(w io.Writer, r cluster.ChunkRepair) {
	if r.Error != "" {
		fmt.Fprintf(w, "  FAILED   site %s offset %d length %d (from %v): %s\n", r.Site, r.Offset, r.Length, r.Sources, r.Error)
		return
	}
	fmt.Fprintf(w, "  repaired site %s offset %d length %d from %v (%s written)\n", r.Site, r.Offset, r.Length, r.Sources, config.FormatSize(r.RepairedBytes))
}

func (s repairSummary) print(w io.Writer) {
	fmt.Fprintf(w, "volume %s: %d chunks of %s compared across %d sites %v\n", s.Volume, s.Chunks, config.FormatSize(s.ChunkSize), len(s.Sites), s.Sites)
	for _, r := range s.Repairs {
		printRepair(w, r)
	}
	for site, why := range s.Unreachable {
		fmt.Fprintf(w, "  site %s not compared (not repaired): %s\n", site, why)
	}
	for _, m := range s.NoMajority {
		fmt.Fprintf(w, "  NO MAJORITY at offset %d (+%d): not repaired;", m.Offset, m.Length)
		printHashes(w, m.Hashes)
	}
	for _, m := range s.Remaining {
		fmt.Fprintf(w, "  STILL DIFFERS at offset %d (+%d):", m.Offset, m.Length)
		printHashes(w, m.Hashes)
	}
	for _, e := range s.RecheckErrors {
		fmt.Fprintf(w, "  not verified again after repairing %s\n", e)
	}
	fmt.Fprintf(w, "%d chunk repairs (%d failed), %s written; %d chunks without a majority, %d still differing\n",
		len(s.Repairs), s.Failed, config.FormatSize(s.RepairedBytes), len(s.NoMajority), len(s.Remaining))
	if s.OK {
		if len(s.Repairs) == 0 {
			fmt.Fprintln(w, "all copies identical, nothing repaired")
		} else {
			fmt.Fprintln(w, "all copies identical after the repairs")
		}
	}
}

// printHashes prints each site's hash (shortened) and a newline.
func printHashes(w io.Writer, hashes map[string]string) {
	sites := make([]string, 0, len(hashes))
	for site := range hashes {
		sites = append(sites, site)
	}
	sort.Strings(sites)
	for _, site := range sites {
		h := hashes[site]
		if len(h) > 12 {
			h = h[:12]
		}
		fmt.Fprintf(w, " %s=%s", site, h)
	}
	fmt.Fprintln(w)
}
