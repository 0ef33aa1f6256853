package main

import (
	"crypto/rand"
	"encoding/base64"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/robib/robib/cmd/internal/auth"
)

// newTokenCmd is `robib token new|hash`: API tokens for scripts. The agent
// keeps only a token's SHA-256 (in the authorization policy file), so a
// token is shown once, when it is made.
func newTokenCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "token",
		Short: "Make API tokens for scripts (the policy file keeps only their SHA-256)",
	}
	var role string
	newCmd := &cobra.Command{
		Use:   "new NAME",
		Short: "Print a new random token and the policy entry that grants it a role",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if role != "read" && role != "admin" {
				return fmt.Errorf("--role %q: want read or admin", role)
			}
			// The name must be one the policy accepts: check it by parsing
			// the entry this command prints.
			var b [32]byte
			if _, err := rand.Read(b[:]); err != nil {
				return err
			}
			tok := "robib_" + base64.RawURLEncoding.EncodeToString(b[:])
			entry := fmt.Sprintf("  - name: %s\n    sha256: %s\n    role: %s\n", args[0], auth.TokenHash(tok), role)
			if _, err := auth.Parse([]byte("version: 1\ntokens:\n" + entry)); err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "token (shown once; give it to the script as ROBIB_TOKEN or --token):\n  %s\n\n", tok)
			fmt.Fprintf(out, "add to the tokens of the authorization policy file of every site:\n%s", entry)
			return nil
		},
	}
	newCmd.Flags().StringVar(&role, "role", "read", "role of the token: read or admin")
	hashCmd := &cobra.Command{
		Use:   "hash TOKEN",
		Short: "Print the SHA-256 a policy file keeps for TOKEN",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if args[0] == "" {
				return fmt.Errorf("empty token")
			}
			fmt.Fprintln(cmd.OutOrStdout(), auth.TokenHash(args[0]))
			return nil
		},
	}
	cmd.AddCommand(newCmd, hashCmd)
	return cmd
}
