package main

import (
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/robib/robib/cmd/internal/api"
	"github.com/robib/robib/cmd/internal/config"
)

func newVolumeCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "volume",
		Short: "Create, list, resize, verify, repair and delete volumes",
		Args:  cobra.NoArgs, // an unknown subcommand is an error, not help
		RunE:  func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(newVolumeCreateCmd(g), newVolumeListCmd(g), newVolumeDeleteCmd(g), newVolumeResizeCmd(g), newVolumeVerifyCmd(g), newVolumeRepairCmd(g), newVolumeStatsCmd(g))
	return cmd
}

func newVolumeCreateCmd(g *globals) *cobra.Command {
	var size, blockSize, syncMode string
	cmd := &cobra.Command{
		Use:   "create NAME --size SIZE",
		Short: "Create a volume (sizes like 10GiB, 512M, 1T or bytes)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if size == "" {
				return usageError("--size is required")
			}
			n, err := config.ParseSize(size)
			if err != nil {
				return fmt.Errorf("--size: %w", err)
			}
			var bs int64
			if blockSize != "" {
				if bs, err = config.ParseSize(blockSize); err != nil {
					return fmt.Errorf("--block-size: %w", err)
				}
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			v, err := c.CreateVolume(cmd.Context(), api.CreateVolumeRequest{Name: args[0], Size: n, BlockSize: int(bs), Sync: syncMode})
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "created volume %s (%s, block size %d, sync %s)\n", v.Name, config.FormatSize(v.Size), v.BlockSize, v.Sync)
			return nil
		},
	}
	cmd.Flags().StringVar(&size, "size", "", "volume size, e.g. 10GiB (required)")
	cmd.Flags().StringVar(&blockSize, "block-size", "", "preferred block size (default 4KiB)")
	cmd.Flags().StringVar(&syncMode, "sync", "flush", "flush: writes are acknowledged from the write-back buffer and made durable by FLUSH/FUA; always: every write waits for a majority commit")
	return cmd
}

func newVolumeListCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List volumes",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			vols, err := c.ListVolumes(cmd.Context())
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return printJSON(out, vols)
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSIZE\tBLOCK SIZE\tSYNC\tCREATED")
			for _, v := range vols {
				fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", v.Name, config.FormatSize(v.Size), v.BlockSize, v.Sync, v.Created.Format(time.RFC3339))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func newVolumeDeleteCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a volume and its data",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			if err := c.DeleteVolume(cmd.Context(), args[0]); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "deleted volume %s\n", args[0])
			return nil
		},
	}
}

func newVolumeResizeCmd(g *globals) *cobra.Command {
	var size string
	cmd := &cobra.Command{
		Use:   "resize NAME --size SIZE",
		Short: "Grow or shrink a volume",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if size == "" {
				return usageError("--size is required")
			}
			n, err := config.ParseSize(size)
			if err != nil {
				return fmt.Errorf("--size: %w", err)
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			v, err := c.ResizeVolume(cmd.Context(), args[0], n)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "resized volume %s to %s\n", v.Name, config.FormatSize(v.Size))
			return nil
		},
	}
	cmd.Flags().StringVar(&size, "size", "", "new size, e.g. 20GiB (required)")
	return cmd
}

func newVolumeStatsCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "stats NAME",
		Short: "Show the volume's write-back stage at the site --api points to (commit latency, buffered bytes)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			st, err := c.WriteStage(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return printJSON(out, st)
			}
			if !st.Attached {
				_, err := fmt.Fprintf(out, "volume %s is not attached read-write at site %s\n", st.Volume, st.Site)
				return err
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "volume\t%s (attached read-write at %s)\n", st.Volume, st.Site)
			fmt.Fprintf(tw, "ops accepted\t%d\n", st.Accepted)
			fmt.Fprintf(tw, "batches committed\t%d (%s of writes, %d retried)\n", st.Batches, config.FormatSize(int64(st.Bytes)), st.Retries)
			fmt.Fprintf(tw, "in flight / buffered\t%d batches / %s\n", st.Inflight, config.FormatSize(st.BufferedBytes))
			fmt.Fprintf(tw, "commit latency\tp50 %dµs, p99 %dµs (newest %d commits), mean %dµs\n",
				st.CommitP50US, st.CommitP99US, min(st.Commits, 1024), st.CommitMeanUS)
			if err := tw.Flush(); err != nil {
				return err
			}
			if len(st.Breakdown) == 0 {
				return nil
			}
			fmt.Fprintf(out, "\nwhere writes spend their time (newest 1024 of each stage):\n")
			tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "SITE\tSTAGE\tP50\tP99\tCOUNT\n")
			for _, x := range st.Breakdown {
				fmt.Fprintf(tw, "%s\t%s\t%dµs\t%dµs\t%d\n", x.Site, x.Stage, x.P50US, x.P99US, x.Count)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
