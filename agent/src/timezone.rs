//! `TZ`: a named IANA time zone as a chrono [`TimeZone`], so that `CRONTAB` and the sources'
//! cron schedules (croner works in chrono) are read in it. The zone's rules come from jiff,
//! which reads the database the machine already has (`/usr/share/zoneinfo` on Linux, kept
//! current by the system's tzdata updates) and carries its own copy only on Windows.
//!
//! Why not chrono-tz: it compiles the whole database into the executable as tables of
//! pointers, about 1 MB that the dynamic loader must relocate, and so copy into private memory,
//! at every start of the agent — most of the gap to the idle-memory goal (docs/PROFILES.md).

use std::fmt;

use chrono::{FixedOffset, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, Offset, TimeZone};
use jiff::tz::AmbiguousOffset;

/// A named time zone, such as `America/Sao_Paulo`.
#[derive(Clone)]
pub struct Zone {
    name: String,
    tz: jiff::tz::TimeZone,
}

impl Zone {
    /// Looks `name` up in the time zone database; `None` if there is no such zone.
    pub fn named(name: &str) -> Option<Self> {
        let tz = jiff::tz::TimeZone::get(name).ok()?;
        Some(Self {
            name: name.to_owned(),
            tz,
        })
    }

    /// The IANA name, as configured.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn offset(&self, offset: jiff::tz::Offset) -> ZoneOffset {
        ZoneOffset {
            zone: self.clone(),
            fixed: FixedOffset::east_opt(offset.seconds())
                .unwrap_or(FixedOffset::east_opt(0).expect("zero offset")),
        }
    }
}

impl fmt::Debug for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl PartialEq for Zone {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

/// The offset from UTC a [`Zone`] has at some instant (chrono keeps the zone in it).
#[derive(Clone)]
pub struct ZoneOffset {
    zone: Zone,
    fixed: FixedOffset,
}

impl fmt::Debug for ZoneOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.fixed, self.zone.name)
    }
}

impl fmt::Display for ZoneOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.fixed, f)
    }
}

impl Offset for ZoneOffset {
    fn fix(&self) -> FixedOffset {
        self.fixed
    }
}

impl TimeZone for Zone {
    type Offset = ZoneOffset;

    fn from_offset(offset: &ZoneOffset) -> Self {
        offset.zone.clone()
    }

    fn offset_from_local_date(&self, local: &NaiveDate) -> LocalResult<ZoneOffset> {
        self.offset_from_local_datetime(&local.and_time(NaiveTime::MIN))
    }

    /// A wall-clock time skipped by a transition has no offset; one repeated has two.
    fn offset_from_local_datetime(&self, local: &NaiveDateTime) -> LocalResult<ZoneOffset> {
        let Some(civil) = civil(local) else {
            return LocalResult::None;
        };
        match self.tz.to_ambiguous_timestamp(civil).offset() {
            AmbiguousOffset::Unambiguous { offset } => LocalResult::Single(self.offset(offset)),
            AmbiguousOffset::Gap { .. } => LocalResult::None,
            AmbiguousOffset::Fold { before, after } => {
                LocalResult::Ambiguous(self.offset(before), self.offset(after))
            }
        }
    }

    fn offset_from_utc_date(&self, utc: &NaiveDate) -> ZoneOffset {
        self.offset_from_utc_datetime(&utc.and_time(NaiveTime::MIN))
    }

    fn offset_from_utc_datetime(&self, utc: &NaiveDateTime) -> ZoneOffset {
        let offset = jiff::Timestamp::from_second(utc.and_utc().timestamp())
            .map(|instant| self.tz.to_offset(instant))
            .unwrap_or(jiff::tz::Offset::UTC);
        self.offset(offset)
    }
}

/// The same wall-clock time in jiff's terms; `None` outside jiff's range (years -9999..=9999).
fn civil(local: &NaiveDateTime) -> Option<jiff::civil::DateTime> {
    use chrono::{Datelike, Timelike};
    jiff::civil::DateTime::new(
        i16::try_from(local.year()).ok()?,
        local.month() as i8,
        local.day() as i8,
        local.hour() as i8,
        local.minute() as i8,
        local.second() as i8,
        local.nanosecond().min(999_999_999) as i32,
    )
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn utc(text: &str) -> chrono::DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn offsets_follow_the_zone_rules_including_past_daylight_saving() {
        let sao_paulo = Zone::named("America/Sao_Paulo").unwrap();
        // Brazil dropped daylight saving in 2019: -03:00 now, -02:00 in January 2018.
        let now = utc("2026-01-15T12:00:00Z").with_timezone(&sao_paulo);
        assert_eq!(now.offset().fix().local_minus_utc(), -3 * 3600);
        let then = utc("2018-01-15T12:00:00Z").with_timezone(&sao_paulo);
        assert_eq!(then.offset().fix().local_minus_utc(), -2 * 3600);
        assert_eq!(now.with_timezone(&Utc), utc("2026-01-15T12:00:00Z"));
    }

    #[test]
    fn skipped_and_repeated_wall_clock_times_are_reported() {
        let new_york = Zone::named("America/New_York").unwrap();
        let at = |s: &str| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").unwrap();
        // 2026-03-08 02:30 does not exist in New York; 2026-11-01 01:30 happens twice.
        assert!(matches!(
            new_york.offset_from_local_datetime(&at("2026-03-08 02:30")),
            LocalResult::None
        ));
        assert!(matches!(
            new_york.offset_from_local_datetime(&at("2026-11-01 01:30")),
            LocalResult::Ambiguous(_, _)
        ));
        assert!(matches!(
            new_york.offset_from_local_datetime(&at("2026-07-01 12:00")),
            LocalResult::Single(_)
        ));
    }

    #[test]
    fn unknown_names_are_none() {
        assert!(Zone::named("Mars/Olympus").is_none());
        assert_eq!(Zone::named("UTC").unwrap().name(), "UTC");
    }
}
