//! Bounded label values: an enum whose every value has one fixed spelling, used in metric
//! labels, JSON documents, logs and summaries alike.
//!
//! [`labelled!`](labelled) declares such an enum with each variant's spelling next to
//! it, and derives from that one list `ALL` (every value, in declaration order: metric
//! series are initialised in this order), `as_str`, [`Label`], `Display` and `Serialize`
//! (the spelling, as a string). A new variant therefore has its label, its series and its
//! JSON form at once. This module depends on nothing of the crate, so the pure modules
//! (`plan`, `snapshot`) can use it without importing `metrics`.

/// An enum with a fixed, bounded set of label values.
pub trait Label: Copy + 'static {
    /// Every value, in declaration order.
    const VALUES: &'static [Self];

    /// The value's spelling.
    fn label(self) -> &'static str;
}

/// Declares an enum whose variants are written `Variant = "label"`; see the module's notes.
/// Attributes (docs, derives) on the enum and its variants are kept; the enum must derive
/// `Clone` and `Copy`.
macro_rules! labelled {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $label:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every value, in declaration order (metric series are initialised in this
            /// order).
            pub const ALL: [$name; [$($label),+].len()] = [$($name::$variant),+];

            /// The value's label, as metrics, JSON and summaries spell it.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $label ),+
                }
            }
        }

        impl $crate::label::Label for $name {
            const VALUES: &'static [Self] = &$name::ALL;

            fn label(self) -> &'static str {
                self.as_str()
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}
pub(crate) use labelled;

#[cfg(test)]
mod tests {
    use super::Label;

    super::labelled! {
        /// A test enum.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Colour {
            /// Documented.
            Red = "red",
            DarkBlue = "dark_blue",
        }
    }

    #[test]
    fn every_value_has_its_spelling_everywhere() {
        assert_eq!(Colour::ALL, [Colour::Red, Colour::DarkBlue]);
        assert_eq!(Colour::VALUES, &Colour::ALL);
        assert_eq!(Colour::DarkBlue.as_str(), "dark_blue");
        assert_eq!(Colour::DarkBlue.label(), "dark_blue");
        assert_eq!(Colour::Red.to_string(), "red");
        assert_eq!(
            serde_json::to_string(&Colour::DarkBlue).unwrap(),
            "\"dark_blue\""
        );
    }
}
