package auth

import (
	"context"
	"fmt"
	"net/http"
	"strings"
)

// NeedOf is what a request to the agent's HTTP listener needs: the
// site-to-site endpoints (/internal/) a site; profiling an admin; the
// health probe nothing; other GETs of the admin API read, the rest admin.
// Unknown paths need admin, so a new endpoint is closed until classified.
func NeedOf(r *http.Request) Need {
	p := r.URL.Path
	switch {
	case strings.HasPrefix(p, "/internal/"):
		return NeedSite
	case p == "/v1/health":
		return NeedNone
	case strings.HasPrefix(p, "/debug/"):
		return NeedAdmin
	case strings.HasPrefix(p, "/v1/") && (r.Method == http.MethodGet || r.Method == http.MethodHead):
		return NeedRead
	}
	return NeedAdmin
}

type ctxKey struct{}

// WithIdentity returns ctx carrying id (the Guard does this for every
// request it lets through).
func WithIdentity(ctx context.Context, id Identity) context.Context {
	return context.WithValue(ctx, ctxKey{}, id)
}

// FromContext is the identity Guard attached to a request's context.
func FromContext(ctx context.Context) (Identity, bool) {
	id, ok := ctx.Value(ctxKey{}).(Identity)
	return id, ok
}

// Guard authenticates and authorizes every request before next sees it.
// certIdentity gives the identity of a verified client certificate on the
// request's connection (ok false: none). A bearer token, when given, is
// the identity instead, and an unknown one is refused whatever the
// certificate says. Refusals go to fail (which writes the status the edge
// maps the error to) and never reach next.
//
// policy gives the policy in force for each request (it may change while
// the guard serves: a reloaded file).
func Guard(next http.Handler, policy func() *Policy, certIdentity func(*http.Request) (Identity, bool), fail func(http.ResponseWriter, *http.Request, error)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p := policy()
		id, err := Authenticate(r, p, certIdentity)
		if err == nil {
			err = p.Require(id, NeedOf(r), r.Method+" "+r.URL.Path)
		}
		if err != nil {
			w.Header().Set("WWW-Authenticate", `Bearer realm="robib"`)
			fail(w, r, err)
			return
		}
		next.ServeHTTP(w, r.WithContext(WithIdentity(r.Context(), id)))
	})
}

// Authenticate is the identity a request shows: its bearer token's, else
// its verified client certificate's, else anonymous.
func Authenticate(r *http.Request, p *Policy, certIdentity func(*http.Request) (Identity, bool)) (Identity, error) {
	if h := r.Header.Get("Authorization"); h != "" {
		scheme, tok, ok := strings.Cut(h, " ")
		if !ok || !strings.EqualFold(scheme, "Bearer") {
			return Identity{}, fmt.Errorf("%w: Authorization header: want \"Bearer TOKEN\"", ErrUnauthenticated)
		}
		return p.Token(strings.TrimSpace(tok))
	}
	if certIdentity != nil {
		if id, ok := certIdentity(r); ok {
			return id, nil
		}
	}
	return Identity{}, nil
}
